"""The study storage opened by several workers at once: on a new database each of them creates
Optuna's tables, and the ones that lose that race must still open it (two machines starting
`vaepipe tune` together on a new PostgreSQL database met exactly this)."""

import multiprocessing

WORKERS = 4
ROUNDS = 2  # the race is lost in most rounds without the retry


def open_at_once(url: str, barrier, results) -> None:
    from vaepipe.errors import VaepipeError
    from vaepipe.tuning import study

    barrier.wait()
    try:
        study.open_storage(url, heartbeat=15)
        results.put("ok")
    except VaepipeError as e:
        results.put(str(e))


def test_workers_opening_a_new_study_database_at_once_all_open_it(tmp_path):
    import optuna  # noqa: F401  imported once, before the workers fork
    import sqlalchemy  # noqa: F401

    ctx = multiprocessing.get_context("fork")
    for n in range(ROUNDS):
        url = f"sqlite:///{tmp_path / f'study-{n}.db'}"
        barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
        procs = [
            ctx.Process(target=open_at_once, args=(url, barrier, results)) for _ in range(WORKERS)
        ]
        for p in procs:
            p.start()
        got = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert got == ["ok"] * WORKERS, got


def test_an_unreachable_database_is_refused_at_once_not_retried(tmp_path):
    from vaepipe.errors import VaepipeError
    from vaepipe.tuning import study

    url = f"sqlite:///{tmp_path / 'missing' / 'study.db'}"  # its folder does not exist
    try:
        study.open_storage(url, heartbeat=15)
    except VaepipeError as e:
        assert str(e).startswith(f"cannot open the study storage {url}: "), e
        assert "unable to open database file" in str(e), e
    else:
        raise AssertionError("a storage in a missing folder opened")


def claim_at_once(study_url: str, store: str, barrier, results) -> None:
    import os

    import optuna

    from vaepipe.tuning import study, summary

    os.environ["MLFLOW_TRACKING_URI"] = store
    storage = study.open_storage(study_url, heartbeat=15)
    loaded = optuna.load_study(study_name="s", storage=storage)
    barrier.wait()
    results.put(summary.parent_run(loaded, storage, "vaepipe"))


def test_workers_starting_a_study_together_nest_under_one_run_and_delete_the_others(tmp_path):
    """Each worker makes a study run; the first one recorded in the study is every worker's,
    and the others' runs are deleted (Optuna's own setter lets the last one win, after the
    first worker may already have nested a trial under its own)."""
    import mlflow
    import optuna  # noqa: F401  imported once, before the workers fork

    from vaepipe.tuning import study, summary

    ctx = multiprocessing.get_context("fork")
    for n in range(ROUNDS):
        url = f"sqlite:///{tmp_path / f'study-{n}.db'}"
        store = f"sqlite:///{tmp_path / f'mlflow-{n}' / 'mlflow.db'}"
        optuna.create_study(study_name="s", storage=study.open_storage(url, heartbeat=15))
        mlflow.MlflowClient(store).create_experiment("vaepipe")  # the store's tables, once
        barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
        procs = [
            ctx.Process(target=claim_at_once, args=(url, store, barrier, results))
            for _ in range(WORKERS)
        ]
        for p in procs:
            p.start()
        got = {results.get(timeout=120) for _ in procs}
        for p in procs:
            p.join(timeout=60)
        assert len(got) == 1, got
        client = mlflow.MlflowClient(store)
        exp = client.get_experiment_by_name("vaepipe")
        alive = client.search_runs([exp.experiment_id])
        assert [r.info.run_id for r in alive] == list(got)
        loaded = optuna.load_study(study_name="s", storage=url)
        assert loaded.user_attrs[summary.PARENT_ATTR] == got.pop()


def test_a_study_whose_run_is_not_in_the_store_gets_a_new_one(tmp_path, monkeypatch):
    import optuna

    from vaepipe.tuning import study, summary

    store = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    storage = study.open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=15)
    s = optuna.create_study(study_name="s", storage=storage)
    first = summary.parent_run(s, storage, "vaepipe")
    assert summary.parent_run(s, storage, "vaepipe") == first  # known: kept
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.replace("mlflow/", "other/"))
    second = summary.parent_run(s, storage, "vaepipe")
    assert second != first and s.user_attrs[summary.PARENT_ATTR] == second
