"""`make ui`: `mlflow ui` on the project's store at 127.0.0.1:5000, and the address that opens
it on the experiment's runs in model-training mode. MLflow's sidebar mode is a per-browser
setting that starts in GenAI mode (traces, prompts); the `workflowType=machine_learning`
parameter switches it. Standard library only.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

DB = Path("mlruns") / "mlflow.db"
EXPERIMENT = "vaepipe"
HOST, PORT = "127.0.0.1", 5000


def address(db: Path = DB, experiment: str = EXPERIMENT, port: int = PORT) -> str:
    """The UI's address of `experiment`'s runs in model-training mode (its id read from the
    store; the experiments list when it has none yet)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        row = con.execute(
            "SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)
        ).fetchone()
    where = f"experiments/{row[0]}/runs" if row else "experiments"
    return f"http://{HOST}:{port}/#/{where}?workflowType=machine_learning"


def main() -> int:
    if not DB.is_file():
        sys.stderr.write(f"error: no MLflow store at {DB}: run the pipeline first (make run)\n")
        return 2
    print(f"mlflow ui: open {address()}", flush=True)
    mlflow = str(Path(sys.executable).parent / "mlflow")
    cmd = ["ui", "--backend-store-uri", f"sqlite:///{DB}", "--host", HOST, "--port", str(PORT)]
    # MLflow's job runner (GenAI scorers, trace rollups: 8 more processes polling the store)
    # serves nothing this project logs
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(mlflow, [mlflow, *cmd])


if __name__ == "__main__":
    sys.exit(main())
