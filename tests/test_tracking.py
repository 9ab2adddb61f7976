"""Store resolution and a damaged store (real sqlite files, no server)."""

import pytest

from vaepipe import tracking


def test_store_follows_dvc_root_then_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "real-root"))
    assert (
        tracking.tracking_uri() == f"sqlite:///{tmp_path / 'real-root' / 'mlruns' / 'mlflow.db'}"
    )
    uri = tracking.tracking_uri()
    assert tracking.artifact_location(uri) == (tmp_path / "real-root/mlruns/artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.artifact_location("http://127.0.0.1:5000") is None


def test_damaged_store_is_a_clear_error_and_left_as_it_was(tmp_path, monkeypatch):
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    db.write_bytes(b"not a database")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    with pytest.raises(tracking.TrackingError, match="cannot open MLflow experiment 'vaepipe'"):
        tracking.setup("vaepipe")
    assert db.read_bytes() == b"not a database"
