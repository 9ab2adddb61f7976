"""End to end: what export registers and what `vaepipe promote` reads of it, through `dvc
repro`, `vaepipe promote` and the project's real sqlite store.

One project, three exports (module fixture): run A; run B, trained longer; run B again after
evaluate reran with another evaluate.seed. Each version must be judged on its own per-image
NLLs, an export rerun must register nothing new, an interrupted registration must stay
invisible until export finishes it, and the encoder and scorer that move with a decoder must
be those of its export."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
from helpers import default_store, set_params, sh

# scikit-learn's digits, one epoch, 300 images for the IWAE bound: seconds a stage
QUICK = {"train.epochs": 1, "evaluate.iwae_n": 300, "export.scorer_k": 8}
VAEPIPE = str(Path(sys.executable).parent / "vaepipe")
MODELS = ("vae-encoder", "vae-decoder", "vae-scorer")


@pytest.fixture(scope="module")
def repo(new_project):
    """Decoder (and encoder, scorer) v1 of run A, v2 of run B (trained longer), v3 of run B
    after evaluate reran with evaluate.seed 1."""
    repo = new_project("registration", **QUICK)
    sh(repo, "dvc", "repro", timeout=900)
    set_params(repo, **{"train.epochs": 3})
    sh(repo, "dvc", "repro", timeout=900)
    set_params(repo, **{"evaluate.seed": 1})
    sh(repo, "dvc", "repro", timeout=900)
    return repo


def client(repo):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")


def versions(c, name: str) -> list:
    """Every version of `name` in the store, complete or not, oldest first."""
    return sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def numbers(c, name: str) -> list[str]:
    return [str(v.version) for v in versions(c, name)]


def promote(repo, *args):
    return sh(repo, VAEPIPE, "promote", *args, check=False)


def row(out: str, version: str) -> list[str]:
    """The fields of promote's table line of `version` ('v2', ...)."""
    lines = [line.split() for line in out.splitlines() if line.startswith(f"{version} ")]
    assert len(lines) == 1, out
    return lines[0]


def tagged_diff(c, candidate: str, champion: str) -> float:
    def nll(v):
        return float(c.get_model_version("vae-decoder", v).tags["test_nll_iwae"])

    return nll(candidate) - nll(champion)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_version_is_complete_with_its_graph_digest_export_id_and_nll_file(repo):
    c = client(repo)
    by_model = {name: versions(c, name) for name in MODELS}
    for name, found in by_model.items():
        assert [str(v.version) for v in found] == ["1", "2", "3"], name
        for v in found:
            assert v.tags["complete"] == "true" and v.description, (name, v.version)
            assert len(v.tags["onnx_sha256"]) == 64 and len(v.tags["export_id"]) == 16
        graph = repo / "models" / f"{name.removeprefix('vae-')}.onnx"
        assert found[-1].tags["onnx_sha256"] == sha256(graph)  # the files of the last export
    # the three graphs of one export share its id; each export has its own
    exports = [{by_model[name][i].tags["export_id"] for name in MODELS} for i in range(3)]
    assert all(len(ids) == 1 for ids in exports) and len(set.union(*exports)) == 3
    decoders = by_model["vae-decoder"]
    run_b = decoders[1].run_id
    assert decoders[2].run_id == run_b != decoders[0].run_id
    files = {a.path for a in c.list_artifacts(run_b, "evaluation/per_image_nll")}
    named = {v.tags["per_image_nll"] for v in decoders[1:]}
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert named == files and len(files) == 2, (named, files)
    assert f"evaluation/per_image_nll/k8-n300-seed1-{ev['data_digest']}.npz" in files


def test_promote_pairs_each_version_with_the_per_image_nlls_it_was_judged_on(repo):
    c = client(repo)
    assert promote(repo, "--force", "--version", "1").returncode == 0  # run A's: the champion
    proc = promote(repo, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    # v2 was measured with seed 0, and run B's last evaluate used seed 1: promote must still
    # pair v2's own seed-0 NLLs, whose mean difference is the difference of the tags
    assert float(row(proc.stdout, "v2")[4]) == pytest.approx(tagged_diff(c, "2", "1"), abs=0.011)
    assert "refused: evaluate_seed 1 != 0 (--force to override)" in proc.stdout


def test_a_version_without_the_file_tag_is_paired_only_when_its_runs_file_matches(repo):
    """Versions registered before the `per_image_nll` tag read evaluation/per_image_nll.npz,
    the run's latest evaluate: used when what it records matches their tags, else refused."""
    c = client(repo)
    assert promote(repo, "--force", "--version", "1").returncode == 0
    keep = {v: c.get_model_version("vae-decoder", v).tags.get("per_image_nll") for v in "12"}
    try:
        c.delete_model_version_tag("vae-decoder", "1", "per_image_nll")  # run A: seed 0 still
        proc = promote(repo, "--dry-run")
        assert proc.returncode == 0, proc.stderr
        diff = float(row(proc.stdout, "v2")[4])
        assert diff == pytest.approx(tagged_diff(c, "2", "1"), abs=0.011)
        c.delete_model_version_tag("vae-decoder", "2", "per_image_nll")  # run B: now seed 1
        proc = promote(repo, "--dry-run")
        assert proc.returncode == 0, proc.stderr
        line = " ".join(row(proc.stdout, "v2"))
        assert "refused: evaluation/per_image_nll.npz of run" in line, proc.stdout
        assert "records evaluate_seed 1, its tags say 0" in line and "better by" not in line
    finally:
        for v, path in keep.items():
            if path is not None:
                c.set_model_version_tag("vae-decoder", v, "per_image_nll", path)


def test_force_version_moves_the_encoder_and_scorer_of_the_same_export(repo):
    c = client(repo)
    proc = promote(repo, "--force", "--version", "2")  # run B has two exports: v2 and v3
    assert proc.returncode == 0, proc.stderr
    decoder = c.get_model_version_by_alias("vae-decoder", "champion")
    assert str(decoder.version) == "2"
    for name in ("vae-encoder", "vae-scorer"):
        moved = c.get_model_version_by_alias(name, "champion")
        assert str(moved.version) == "2", proc.stdout
        assert moved.tags["export_id"] == decoder.tags["export_id"]
        assert f"{name}@champion -> v2" in proc.stdout
    # versions registered before export ids: the one of the same run registered with it
    untag = [(name, v) for name in MODELS for v in "23"]
    ids = {key: c.get_model_version(*key).tags["export_id"] for key in untag}
    try:
        for key in untag:
            c.delete_model_version_tag(*key, "export_id")
        for version in ("3", "2"):
            proc = promote(repo, "--force", "--version", version)
            assert proc.returncode == 0, proc.stderr
            for name in ("vae-encoder", "vae-scorer"):
                moved = c.get_model_version_by_alias(name, "champion").version
                assert str(moved) == version, proc.stdout
    finally:
        for key, export in ids.items():
            c.set_model_version_tag(*key, "export_id", export)


def test_an_export_rerun_of_the_same_graphs_registers_no_new_version(repo):
    c = client(repo)
    before = {name: numbers(c, name) for name in MODELS}
    proc = sh(repo, "dvc", "repro", "-f", "-s", "export", timeout=900)
    assert "vae-decoder v3 (registered before: reused)" in proc.stdout, proc.stdout
    assert {name: numbers(c, name) for name in MODELS} == before


def test_an_interrupted_registration_is_invisible_until_export_finishes_it(repo):
    c = client(repo)
    last = c.get_model_version("vae-decoder", "3")  # run B's latest export: models/decoder.onnx
    # what an interruption right after the version was created leaves: no tags, no card
    c.delete_model_version("vae-decoder", "3")
    with default_store(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"):
        orphan = c.create_model_version("vae-decoder", last.source, run_id=last.run_id)
    assert str(orphan.version) == "4" and not orphan.tags
    # and one stopped before its description and completeness tag
    c.set_model_version_tag("vae-encoder", "3", "complete", "false")
    c.update_model_version("vae-encoder", "3", description="")
    proc = promote(repo, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("v")]
    assert not any(line.startswith("v4 ") for line in table), proc.stdout
    assert "not considered: vae-decoder v4" in proc.stdout
    proc = promote(repo, "--model", "vae-encoder", "--dry-run")
    assert not any(line.startswith("v3 ") for line in proc.stdout.splitlines()), proc.stdout
    proc = promote(repo, "--version", "4")
    assert proc.returncode == 2 and "v4 is an incomplete registration" in proc.stderr
    sh(repo, "dvc", "repro", "-f", "-s", "export", timeout=900)
    assert numbers(c, "vae-decoder") == ["1", "2", "4"]
    assert numbers(c, "vae-encoder") == ["1", "2", "3"]
    finished = c.get_model_version("vae-decoder", "4")
    encoder = c.get_model_version("vae-encoder", "3")
    for v in (finished, encoder):
        assert v.tags["complete"] == "true" and "## Contract" in v.description
    assert finished.tags["export_id"] == encoder.tags["export_id"]
    assert finished.tags["onnx_sha256"] == sha256(repo / "models" / "decoder.onnx")
    assert finished.tags["dataset"] == "digits" and finished.tags["evaluate_seed"] == "1"
