"""MKV_LOG_FORMAT=json: one JSON object a line, for the master's own lines
and gunicorn's error log alike (its access log keeps gunicorn's
access_log_format). A line may carry fields of its own (extra={"fields":
{...}}: the failed-request line of mkvlib.metrics does), each a key of its own."""
import datetime
import json
import logging


class JsonFormatter(logging.Formatter):
    def format(self, record):
        line = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
                "level": record.levelname, "logger": record.name, "pid": record.process,
                "message": record.getMessage()}
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def use_format(log_format):
    """Give every handler of the root logger and of gunicorn's error log the
    format `log_format` names ("text" leaves them as they are)."""
    if log_format != "json":
        return
    for name in (None, "gunicorn.error"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(JsonFormatter())
