"""Stage train: fit the VAE on data/prepared, one MLflow run with every ELBO term per epoch.

Writes models/vae.pt (the best epoch's weights), metrics/train.json (that epoch's figures and
the MLflow run id evaluate and export add to) and plots/train/curves.json. The checkpoint of
every epoch (models/checkpoints/last.pt) is continued by the next run with the same params and
code. With train.nproc x train.nnodes > 1 the stage launches torchrun on itself.
"""

import _venv  # noqa: F401  (first: run with the project's packages)

import os
import sys
from pathlib import Path

from vaepipe import config, paths, tracking
from vaepipe.device import resolve_device, set_threads
from vaepipe.errors import ConfigError, exit_on_user_error
from vaepipe.training import distributed, run, session


def train(params: config.Params, group: distributed.Group, device) -> None:
    threads = set_threads(params.train.threads)
    job = session.prepare(params, group, device, Path(__file__))  # data, model, checkpoint
    if not group.is_main:  # another torchrun process: its slice of every batch
        run.follow(job)
        return
    print(run.describe(job, threads))
    with run.open_run(job) as run_id:
        pictures = run.EpochPictures.of(job)
        clock = run.TrainingClock(job.state)  # counts the seconds a resumed checkpoint carried
        history = run.fit_logged(job, run_id, pictures, clock)
        seconds = clock()
        run.write_outputs(job, history, run_id)
        tracking.log_metrics(
            {
                "train_seconds": seconds,
                "epochs_run": history[-1].epoch,
                "epoch_images_seconds": pictures.seconds,
            }
        )
    print(run.summary(job, history, seconds, pictures, run_id))


@exit_on_user_error
def main() -> None:
    params = config.load(paths.PARAMS)
    t = params.train
    if distributed.requested_world(t) > 1 and not distributed.under_torchrun():
        sys.exit(distributed.launch(t, __file__))  # torchrun runs this script again
    distributed.check_world(t)
    # Under torchrun (WORLD_SIZE > 1): data-parallel, every rank trains, the lead logs.
    node_rank = t.node_rank if t.nnodes > 1 else None
    try:
        with distributed.session(resolve_device(t.device), node_rank) as (group, device):
            train(params, group, device)
    except ConfigError:
        if int(os.environ.get("LOCAL_RANK", "0")):  # every process found the same mistake:
            sys.exit(2)  # the first process of each machine says it
        raise


if __name__ == "__main__":
    main()
