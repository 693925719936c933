"""The S3 gateway beside a test cluster: `gunicorn s3:app` over
the cluster's index and volumes, and boto3 clients for it."""
import os
import signal
import sys

from conftest import Cluster, Server, free_port

ACCESS, SECRET = "mkvtestaccess", "mkvtestsecret"


def gateway_server(cluster, workers=2, **env_vars):
    """The gateway's Server over `cluster` (not started); env_vars: MKV_S3_* and others."""
    port = free_port()
    env = dict(os.environ, MKV_VOLUMES=",".join(cluster.volume_names()), MKV_DB=cluster.db())
    env.update({f"MKV_{k.upper()}": str(v) for k, v in cluster.settings.items()})
    env.update(env_vars)
    argv = [sys.executable, "-m", "gunicorn", "-w", str(workers),   # gunicorn.conf.py's worker
            "-b", f"127.0.0.1:{port}", "s3:app"]
    return Server(f"s3 :{port}", argv, env, os.path.join(cluster.workdir, f"s3-{port}.log"), port,
                  stop_signal=signal.SIGINT, children=workers)


def boto3_client(url, access=ACCESS, secret=SECRET, **config):
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=url, aws_access_key_id=access, aws_secret_access_key=secret,
                        region_name="us-east-1",
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                      connect_timeout=5, read_timeout=20, **config))


def cluster_with_gateway(folder, bucket, **env_vars):
    """A cluster (3 volumes, 2 replicas) and a started gateway over it with
    `bucket` made; yields the gateway (.cluster, .url), then stops both."""
    cluster = Cluster(folder, n_volumes=3, replicas=2)
    try:
        server = gateway_server(cluster, **env_vars).start()
        server.cluster, server.url = cluster, f"http://127.0.0.1:{server.port}"
        try:
            boto3_client(server.url).create_bucket(Bucket=bucket)
            yield server
        finally:
            server.stop()
    finally:
        cluster.kill()
