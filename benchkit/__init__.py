"""The workloads of bench.py and what they share; bench.py, beside this
package, is the entry point (its docstring says what each workload measures).

    common     the bench cluster's settings, logging, running a command
    wrk        wrk: install, run, read its output; Lua for random keys
    servers    stub nginx servers, and Bench: the temporary folder and the
               servers the workloads share
    mkvdata    mkv's data made straight on disk: index files (`fill`), where
               keys go, planted key files; the one module that uses mkvlib
    workload   Workload: what the runner asks of every workload
    gets       get, missing: GETs of one key against bare nginx
    writes     thrash, bigput: writes through the master against the volumes
    repair     rebuild, rebalance: the tools against plain listings and copies
    bigindex   index, list: a big filled index against a small one
    s3         s3get, s3getrelay, s3put, s3small: the S3 gateway against nginx and the native API
    runner     the rounds of one workload, and its row of the table
    report     the table and the machine line
    instructions  `python -m benchkit.instructions`: a GET's instructions per answer,
               mkv's and the bare function's, by cachegrind (no load moves them)
"""
