"""The torchrun params of the train stage (train.nproc, nnodes, node_rank, rdzv_endpoint): what
they validate and what torchrun is asked for. The launches themselves: tests/test_distributed.py
(one machine) and tests/test_team_machines.py (two nodes)."""

import pytest
from helpers import params, params_dict, train_cfg

from vaepipe import config
from vaepipe.errors import ConfigError
from vaepipe.training import distributed


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "'train.node_rank' = 2 must be"),
        ({"node_rank": 1}, "'train.node_rank' = 1 must be below 'train.nnodes' = 1"),
        ({"nnodes": 2}, "'train.nnodes' = 2 needs 'train.rdzv_endpoint' = 'host:port'"),
        ({"rdzv_endpoint": "host0"}, "'train.rdzv_endpoint' = 'host0' must be 'host:port'"),
        ({"rdzv_endpoint": "host0:70000"}, "must be 'host:port' with a port in 1..65535"),
        ({"rdzv_endpoint": "a b:29500"}, "must be 'host:port'"),
        ({"nproc": 0}, "'train.nproc' = 0 is out of range; must be >= 1"),
        ({"nnodes": 0}, "'train.nnodes' = 0 is out of range; must be >= 1"),
        ({"node_rank": -1}, "'train.node_rank' = -1 is out of range; must be >= 0"),
        ({"rdzv_endpoint": 29500}, "'train.rdzv_endpoint' = 29500 must be a string"),
    ],
)  # fmt: skip
def test_bad_launch_params_stop_before_any_work_naming_the_key(train, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.from_dict(params_dict({"train": train}))


@pytest.mark.parametrize("endpoint", ["10.0.0.1:29500", "host0.example:1", "[fe80::1]:29500"])
def test_good_endpoints_are_taken(endpoint):
    p = params(train={"nnodes": 2, "node_rank": 1, "rdzv_endpoint": endpoint})
    assert p.train.rdzv_endpoint == endpoint


def test_one_process_is_the_default_and_launches_nothing():
    t = params().train
    assert (t.nproc, t.nnodes, t.node_rank, t.rdzv_endpoint) == (1, 1, 0, "")
    assert distributed.requested_world(t) == 1


def test_torchrun_is_asked_for_what_the_params_say():
    one_machine = distributed.torchrun_args(train_cfg(nproc=2), "pipeline/train.py")
    assert one_machine == [
        "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "0", "--standalone",
        "pipeline/train.py",
    ]  # fmt: skip
    cfg = train_cfg(nproc=4, nnodes=2, node_rank=1, rdzv_endpoint="host0:29500")
    two = distributed.torchrun_args(cfg, "pipeline/train.py")
    assert two[:6] == ["--nnodes", "2", "--nproc-per-node", "4", "--max-restarts", "0"]
    assert two[6:] == [
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "host0:29500",
        "--rdzv-id", distributed.RDZV_ID, "pipeline/train.py",
    ]  # fmt: skip
    assert distributed.requested_world(cfg) == 8


def test_a_torchrun_of_another_size_than_the_params_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="ask for 2 processes, but torchrun started 3"):
        distributed.check_world(train_cfg(nproc=2))
    distributed.check_world(train_cfg())  # params at 1: a hand-started torchrun is taken as is
