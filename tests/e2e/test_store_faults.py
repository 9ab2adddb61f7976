"""Stores that lie or hide a secret, through the `vaepipe` command: a damaged database, a
driver that is not installed, a password in the tracking URI. Each is one `error:` line, exit
status 2, and no password anywhere in what is printed."""

import http.server
import importlib.util
import sys
import threading
from pathlib import Path

import pytest
from helpers import clean_env, sh
from sandbox import free_port

from vaepipe.errors import VaepipeError, redact

VAEPIPE = str(Path(sys.executable).parent / "vaepipe")
SECRET = "hunter2-s3cret"


def vaepipe(cwd, *argv, **env):
    return sh(cwd, VAEPIPE, *argv, check=False, env=clean_env(**env), timeout=120)


def one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("argv", [("runs",), ("promote", "--model", "vae-decoder")])
def test_a_damaged_sqlite_store_is_one_line(tmp_path, argv):
    (tmp_path / "mlruns").mkdir()
    junk = bytes(range(256)) * 40
    (tmp_path / "mlruns" / "mlflow.db").write_bytes(junk)
    line = one_error_line(vaepipe(tmp_path, *argv))
    assert "cannot be read as an MLflow database" in line and "mlflow.db" in line
    assert (tmp_path / "mlruns" / "mlflow.db").read_bytes() == junk  # left as it was


def test_a_database_uri_without_its_driver_is_one_line_without_the_password(tmp_path):
    uri = f"postgresql://vaepipe:{SECRET}@127.0.0.1:{free_port()}/mlflow"
    line = one_error_line(vaepipe(tmp_path, "runs", MLFLOW_TRACKING_URI=uri))
    assert SECRET not in line and "vaepipe:***@127.0.0.1" in line
    if importlib.util.find_spec("psycopg") is None:
        assert "needs the Python package psycopg" in line
    else:  # the driver is there: the database is what is missing
        assert "unreachable" in line or "refused" in line or "failed" in line


def test_a_password_in_an_unreachable_tracking_uri_is_not_printed(tmp_path):
    uri = f"http://vaepipe:{SECRET}@127.0.0.1:{free_port()}"
    line = one_error_line(vaepipe(tmp_path, "runs", MLFLOW_TRACKING_URI=uri))
    assert SECRET not in line and "unreachable" in line
    assert "Connection refused" in line  # the port, not "Name or service not known"


class _Recorder(http.server.BaseHTTPRequestHandler):
    """/health answers 200; every other call 500. Records the Authorization headers."""

    seen: list[str | None] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.seen.append(self.headers.get("Authorization"))
        self.send_response(200 if self.path.startswith("/health") else 500)
        self.end_headers()
        self.wfile.write(b"OK" if self.path.startswith("/health") else b"{}")

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def test_credentials_in_the_uri_are_sent_as_basic_auth_and_never_printed(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://vaepipe:{SECRET}@127.0.0.1:{server.server_address[1]}"
        proc = vaepipe(
            tmp_path, "runs", MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"
        )
    finally:
        server.shutdown()
        server.server_close()
    line = one_error_line(proc)
    assert SECRET not in proc.stdout + proc.stderr
    assert "unreachable" not in line and "HTTP 500" in line  # it was reached, and failed
    assert _Recorder.seen and _Recorder.seen[0].startswith("Basic ")  # /health, with the user


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://u:p@h:5000/x", "http://u:***@h:5000/x"),
        ("store postgresql+psycopg2://me:a%40b@db/mlflow failed", "me:***@db"),
        ("s3://bucket/key and https://host/path", "s3://bucket/key and https://host/path"),
    ],
)
def test_every_user_error_redacts_uri_passwords(text, shown):
    assert shown in redact(text) and shown in str(VaepipeError(text))
