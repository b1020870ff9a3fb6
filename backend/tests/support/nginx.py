"""Debian's nginx as a real reverse proxy in front of an HTTP upstream, on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from tests.support.real_servers import LOOPBACK, STOP_TIMEOUT_S, require_binary, start_on_free_port, stop_process

NGINX_BINARY = "/usr/sbin/nginx"
NGINX_PACKAGE = "nginx"
CONFIG_NAME = "nginx.conf"
ERROR_LOG_NAME = "error.log"
ACCESS_LOG_NAME = "access.log"
# nginx's stdout and stderr: messages from before the config is read (its error log takes over after).
OUTPUT_NAME = "nginx.out"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
# A graceful stop waits for open requests (a stream in flight); nginx gives up on them itself before our SIGKILL.
SHUTDOWN_TIMEOUT_S = STOP_TIMEOUT_S / 2
UPSTREAM_KEEPALIVE = 16


def error_log(workdir: Path) -> Path:
    """Where `run_nginx(..., workdir=workdir)` writes its error log (upstream timeouts show up here)."""
    return workdir / ERROR_LOG_NAME


def access_log(workdir: Path) -> Path:
    return workdir / ACCESS_LOG_NAME


def _upstream_address(upstream_url: str) -> str:
    parts = urlsplit(upstream_url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise ValueError(f"upstream_url must be http://HOST:PORT, got {upstream_url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        # nginx passes request paths on as they are: a path here would be prepended to none of them.
        raise ValueError(f"upstream_url must be an origin without a path, got {upstream_url!r}")
    return f"{parts.hostname}:{parts.port}"


def _nginx_time(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def render_config(
    *,
    workdir: Path,
    port: int,
    upstream_url: str,
    proxy_read_timeout_s: float,
    proxy_buffering: bool,
) -> str:
    """The whole nginx.conf: one process in the foreground, every path inside `workdir`."""
    # Only root can switch users; nginx's default for root is `nobody`, which cannot reach a private workdir.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    temp_paths = "".join(f"    {kind}_temp_path {workdir / 'temp' / kind};\n" for kind in TEMP_PATHS)
    return f"""\
{user}daemon off;
master_process off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {error_log(workdir)} info;
worker_shutdown_timeout {_nginx_time(SHUTDOWN_TIMEOUT_S)};

events {{
    worker_connections 1024;
}}

http {{
    access_log {access_log(workdir)};
{temp_paths}
    upstream app {{
        server {_upstream_address(upstream_url)};
        keepalive {UPSTREAM_KEEPALIVE};
    }}

    server {{
        listen {LOOPBACK}:{port};

        location / {{
            proxy_pass http://app;
            # HTTP/1.1 with no Connection header: keep-alive to the upstream, and chunked streams pass through.
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout {_nginx_time(proxy_read_timeout_s)};
            proxy_buffering {"on" if proxy_buffering else "off"};
        }}
    }}
}}
"""


@contextlib.contextmanager
def run_nginx(
    upstream_url: str,
    *,
    proxy_read_timeout_s: float,
    proxy_buffering: bool = False,
    workdir: Path,
) -> Iterator[str]:
    """Run nginx as a reverse proxy in front of `upstream_url` (http://HOST:PORT); yield its `http://127.0.0.1:PORT`.

    Its config, pid, temp files and logs (`error_log(workdir)`, `access_log(workdir)`) live in `workdir` and stay
    there for a failing test to show. On exit: SIGQUIT (graceful), then SIGKILL after a deadline.
    """
    binary = require_binary(NGINX_BINARY, NGINX_PACKAGE)
    workdir = workdir.resolve()
    for kind in TEMP_PATHS:
        (workdir / "temp" / kind).mkdir(parents=True, exist_ok=True)
    config = workdir / CONFIG_NAME
    output_path = workdir / OUTPUT_NAME

    with output_path.open("ab") as output:

        def launch(port: int) -> subprocess.Popen[bytes]:
            config.write_text(
                render_config(
                    workdir=workdir,
                    port=port,
                    upstream_url=upstream_url,
                    proxy_read_timeout_s=proxy_read_timeout_s,
                    proxy_buffering=proxy_buffering,
                )
            )
            # -e: without it nginx first opens its compiled-in /var/log/nginx/error.log, which a user cannot write.
            command = [binary, "-p", f"{workdir}/", "-e", str(error_log(workdir)), "-c", str(config)]
            return subprocess.Popen(command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=output, stderr=output)

        process, port = start_on_free_port(
            "nginx", launch, logs=[output_path, error_log(workdir)], graceful=signal.SIGQUIT
        )
        try:
            yield f"http://{LOOPBACK}:{port}"
        finally:
            stop_process(process, graceful=signal.SIGQUIT)
