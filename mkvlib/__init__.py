"""mkv's storage core, one concern per module. The master (mkv.py) and the
tools (rebuild.py, rebalance.py) import names from the module that owns
them; nothing here imports Falcon. Under gunicorn's gevent worker the
standard library is monkey-patched, so the threads and sockets used here
are greenlets and gevent sockets there, and real ones in the tools.

Layers, each importing only those above it:
    errors      the exception kinds, each mapped to a status by mkv.py
    placement   key -> volumes and paths: the original's on-disk format (pure)
    settings    Settings: MKV_* read and checked once
    db          SQLite under gevent: WAL, transactions, busy waits, checkpoints
    lease       per-key locks: their clock, owner tokens, one renewer per process
    index       the keys table and the per-key protocol (claim, finish, note, lock)
    http        the HTTP/1.1 client to nginx: pool, fan-out, uploads, downloads
    exchange    pipelined requests on one connection: listings, a small PUT and its MOVE
    health      what this process knows of each volume: may I read, may I write
    volumes     what a volume's answers mean: has, open, MOVE, delete, listings
    upload      the fenced put: every replica uploaded, then MOVEd onto the key's path
    prober      watches the volumes for health, once a second
    store       what the master does with a key: locate, put, delete, unlink

Beside them: the S3 gateway's (objects, replace, multipart, sigv4, payload,
s3xml, s3req, s3errors; relay and localread send GetObject's bytes), the
operators' (metrics, scrape, counts, progress, runfolder, logs), and openers
(whether another process has the index open: rebalance's grace).
"""
