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
