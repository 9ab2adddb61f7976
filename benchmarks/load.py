"""Bounded load tests on loopback: a served decoder, and the MLflow server under training logs.

    python benchmarks/load.py serve       # mlflow models serve of the registered decoder
    python benchmarks/load.py tracking    # 4 concurrent runs logging per-epoch metrics
    python benchmarks/load.py all

Both use MLFLOW_TRACKING_URI (`make team-up` prints it; `serve` also works on the sqlite store);
`serve` needs the model registered there (`dvc repro` with that URI set registers vae-decoder)
and serves the version of this project's run (metrics/train.json) unless --model says otherwise.
`serve` starts `mlflow models serve -m MODEL --env-manager local` on a free 127.0.0.1 port in its
own process group, sends a fixed number of requests of 1 and of 64 rows from 1 and 4 client
threads (each with a keep-alive connection), and gives p50/p99 latency, throughput, errors and
the server's RSS (all processes of its group) before and after. `tracking` starts N processes
that each log E epochs x M metrics with one mlflow.log_metrics call per epoch, all at once, with
MLflow's client retries off so that every failed call counts, then checks what the server
stored. Every wait is bounded; the served model's process group is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1e3, q)) if seconds else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every process in the group (the CLI, uvicorn and its workers)."""
    total = 0
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[2]) != pgid:
                continue
            for line in (p / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total / 1024


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- serving --------------------------------------------------------------------------------


@contextlib.contextmanager
def served(model: str, port: int, timeout: float):
    """`mlflow models serve` in its own process group; the whole group is stopped on exit."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port)]
    log = open(Path(tempfile.gettempdir()) / f"vaepipe-load-serve-{port}.log", "wb")
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(
                    f"error: mlflow models serve exited ({proc.returncode}); {log.name}"
                )
            if time.monotonic() > deadline:
                raise SystemExit(f"error: mlflow models serve did not answer in {timeout:.0f} s")
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/ping")
                if conn.getresponse().status == 200:
                    break
            time.sleep(0.2)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        deadline = time.monotonic() + 10  # the uvicorn child outlives the CLI unless waited for
        while group_rss_mib(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def fire(port: int, body: bytes, n: int, clients: int) -> tuple[list[float], int, float]:
    """n POSTs from `clients` threads; (latencies of the successful ones, errors, wall s)."""
    lock, latencies, errors, left = threading.Lock(), [], [0], [n]
    headers = {"Content-Type": "application/json"}

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                if left[0] == 0:
                    break
                left[0] -= 1
            t = time.perf_counter()
            try:
                conn.request("POST", "/invocations", body, headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt) if ok else None
                errors[0] += not ok
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return latencies, errors[0], time.perf_counter() - t0


def check_answer(port: int, body: bytes, rows: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = resp.read()
    if resp.status != 200:
        raise SystemExit(f"error: HTTP {resp.status} for {rows} rows: {answer[:200]!r}")
    predictions = json.loads(answer)["predictions"]
    got = len(next(iter(predictions.values())) if isinstance(predictions, dict) else predictions)
    if got != rows:
        raise SystemExit(f"error: {got} predictions for {rows} rows")


def input_spec(model: str) -> tuple[str, list[int]]:
    """The served model's input name and its dims after the batch axis (from its signature)."""
    import mlflow

    spec = mlflow.models.get_model_info(model).signature.inputs.to_dict()[0]
    return spec["name"], [int(d) for d in spec["tensor-spec"]["shape"][1:]]


def request_body(name: str, dims: list[int], rows: int, rng) -> bytes:
    """`rows` inputs: z from N(0, I) for a decoder, images in [0, 1] for encoder and scorer."""
    draw = rng.standard_normal if name == "z" else rng.random
    return json.dumps({"inputs": draw((rows, *dims)).round(4).tolist()}).encode()


def this_runs_decoder(name: str = "vae-decoder") -> str:
    """models:/NAME/VERSION of the version the export stage registered for this project's run."""
    import mlflow

    try:
        run_id = json.loads(Path("metrics/train.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        raise SystemExit(
            "error: no metrics/train.json here: run dvc repro, or pass --model"
        ) from None
    found = mlflow.MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    versions = [v.version for v in found if v.name == name]
    if not versions:
        raise SystemExit(f"error: run {run_id} registered no {name} in this store: pass --model")
    return f"models:/{name}/{versions[0]}"


def bench_serve(args) -> None:
    name, dims = input_spec(args.model)
    port = free_port()
    t0 = time.monotonic()
    rows_out, rss_rows = [], []
    with served(args.model, port, args.start_timeout) as proc:
        start_s = time.monotonic() - t0
        rng = np.random.default_rng(0)
        bodies = {rows: request_body(name, dims, rows, rng) for rows in args.rows}
        for rows, body in bodies.items():  # warm-up (lazy imports), and the answer is right
            check_answer(port, body, rows)
        fire(port, bodies[args.rows[0]], 20, 1)
        rss_rows.append(["20 warm-up requests", f"{group_rss_mib(proc.pid):.0f}"])
        for rows, body in bodies.items():
            for clients in args.clients:
                lat, errors, wall = [], 0, 0.0
                for half in (1, 2):  # RSS after each half: flat if the second adds nothing
                    n = args.requests // 2 if half == 1 else args.requests - args.requests // 2
                    h_lat, h_errors, h_wall = fire(port, body, n, clients)
                    lat, errors, wall = lat + h_lat, errors + h_errors, wall + h_wall
                    rss = group_rss_mib(proc.pid)
                    rss_rows.append(
                        [f"{rows} row(s), {clients} client(s), half {half}", f"{rss:.0f}"]
                    )
                rows_out.append([
                    rows, clients, args.requests, errors,
                    f"{percentile_ms(lat, 50):.1f}", f"{percentile_ms(lat, 99):.1f}",
                    f"{len(lat) / wall:.0f}", f"{rows * len(lat) / wall:,.0f}",
                ])  # fmt: skip
    print(f"\n`mlflow models serve -m {args.model}` ({name} {dims}), up in {start_s:.1f} s:\n")
    header = ["rows/request", "clients", "requests", "errors", "p50 ms", "p99 ms", "req/s"]
    print(table([*header, "rows/s"], rows_out))
    print()
    print(table(["server RSS (its process group), after", "MiB"], rss_rows))


# --- tracking server ------------------------------------------------------------------------


def log_run(uri: str, experiment: str, epochs: int, metrics: int, start_at: float) -> None:
    """One worker: a run logging `metrics` values per epoch; prints its figures as JSON."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # a failed call must count, not retry
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    latencies, failed = [], 0
    time.sleep(max(0.0, start_at - time.time()))
    with mlflow.start_run() as run:
        for epoch in range(epochs):
            values = {f"load/m{j}": float(np.sin(epoch + j)) for j in range(metrics)}
            t = time.perf_counter()
            try:
                mlflow.log_metrics(values, step=epoch)
            except Exception:  # any failure of the call is what we count
                failed += 1
            latencies.append(time.perf_counter() - t)
    print(json.dumps({"run_id": run.info.run_id, "latencies": latencies, "failed": failed}))


def bench_tracking(args) -> None:
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith("http"):
        raise SystemExit("error: set MLFLOW_TRACKING_URI to the team server (make team-up)")
    experiment = f"load-{time.strftime('%Y%m%d-%H%M%S')}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.create_experiment(experiment)  # before the workers, which would race to create it
    start_at = time.time() + 8  # all workers imported mlflow by then, so they log together
    worker = [sys.executable, __file__, "_log", uri, experiment, str(args.epochs)]
    procs = [
        subprocess.Popen([*worker, str(args.metrics), str(start_at)], stdout=subprocess.PIPE)
        for _ in range(args.runs)
    ]
    t0 = time.time()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=args.timeout)
        if p.returncode:
            raise SystemExit(f"error: a logging worker exited with {p.returncode}")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    wall = time.time() - max(t0, start_at)
    lat = [x for r in results for x in r["latencies"]]
    stored = sum(
        len(client.get_metric_history(r["run_id"], f"load/m{j}"))
        for r in results
        for j in range(args.metrics)
    )
    expected = args.runs * args.epochs * args.metrics
    print(f"\nMLflow server {uri}, {args.runs} concurrent runs, one log_metrics per epoch:\n")
    header = ["runs", "epochs x metrics", "calls", "failed", "p50 ms", "p99 ms", "calls/s"]
    print(table([*header, "points stored"], [[
        args.runs, f"{args.epochs} x {args.metrics}", len(lat), sum(r["failed"] for r in results),
        f"{percentile_ms(lat, 50):.1f}", f"{percentile_ms(lat, 99):.1f}",
        f"{len(lat) / wall:.0f}", f"{stored:,} / {expected:,}",
    ]]))  # fmt: skip


def main() -> None:
    if sys.argv[1:2] == ["_log"]:
        uri, experiment, epochs, metrics, start_at = sys.argv[2:7]
        return log_run(uri, experiment, int(epochs), int(metrics), float(start_at))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("serve", "tracking", "all"))
    ap.add_argument(
        "--model",
        help="model URI to serve, e.g. models:/vae-scorer@champion (default: the vae-decoder "
        "version registered by the run of metrics/train.json; never `latest`, which is "
        "whichever run finished last)",
    )
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64], help="rows per request")
    ap.add_argument("--requests", type=int, default=500, help="requests per table row")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="client threads")
    ap.add_argument("--start-timeout", type=float, default=180, help="s for the server to answer")
    ap.add_argument("--runs", type=int, default=4, help="concurrent logging processes")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--metrics", type=int, default=10, help="metrics per epoch")
    ap.add_argument("--timeout", type=float, default=300, help="s for each logging process")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, 1-minute load average {os.getloadavg()[0]:.1f} at the start")
    if args.what in ("serve", "all"):
        args.model = args.model or this_runs_decoder()
        bench_serve(args)
    if args.what in ("tracking", "all"):
        bench_tracking(args)


if __name__ == "__main__":
    main()
