"""Multi-process training on 2 CPU processes (gloo): DDP, FSDP2 and the ``aligner train`` CLI under torchrun.

Reliability rules, because a hung rank would hang the suite:

- ranks are started with ``torch.multiprocessing`` (spawn) and meet through a ``FileStore`` in the
  test's tmp_path, so no port can be taken by another run; torchrun (the CLI test) gets a free
  port and a c10d rendezvous on it, in its own process group;
- every wait has a timeout: the process group's (every collective), the join of the ranks, the
  torchrun subprocess; a rank that ends with its work done leaves with ``os._exit(0)`` because
  gloo/OpenMP threads were seen to hang interpreter teardown;
- the ``reaper`` fixture kills, by process id, every rank or launcher a test started that is
  still alive when the test ends, passed or failed.

Running this file as a script is one rank of ``aligner train`` (see ``_cli_rank``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import save_tiny_model, tiny_model

import aligner

WORLD = 2
VOCAB = 300
# Each rank builds the same random model (tiny_models.tiny_model, seed 0).
MODEL = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, max_position_embeddings=64
)
# Generous, because the 2 CI cores may be shared: each rank imports transformers (~7 s of CPU),
# and these limits only have to turn a hang into a failure.
TIMEOUT = timedelta(seconds=120)  # every collective of the process group
JOIN_SECONDS = 360  # the ranks of one spawn, start-up (imports) included
TORCHRUN_SECONDS = 360  # torchrun: two interpreters importing transformers, then training


# --------------------------------------------------------------------------------------------
# Launching ranks


@pytest.fixture(scope="module")
def reaper():
    """Register started processes; when the tests end, SIGKILL each one still alive: a spawned rank
    (``multiprocessing.Process``) by its pid, a launcher (``subprocess.Popen`` started in its own
    session) by its process group, which also ends ranks that outlived the launcher."""
    started: list = []
    yield started.append
    for process in started:
        try:
            if isinstance(process, subprocess.Popen):
                os.killpg(process.pid, signal.SIGKILL)
            elif process.is_alive():  # not yet reaped, so the pid is still this process's
                os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone: the normal case


def _run_ranks(function, reaper, out: Path) -> None:
    """``function(rank, store_path, out, deadline)`` on WORLD spawned processes (deadline: wall-clock
    seconds); fails on any rank's error (with its traceback) or when they have not all finished
    within JOIN_SECONDS."""
    import torch.multiprocessing as mp

    deadline = time.time() + JOIN_SECONDS
    context = mp.start_processes(
        function,
        args=(str(out / "store"), str(out), deadline),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    for process in context.processes:
        reaper(process)
    while not context.join(timeout=max(1.0, deadline - time.time())):
        if time.time() > deadline:
            alive = [p.pid for p in context.processes if p.is_alive()]
            for process in context.processes:
                process.kill()
            logs = "\n".join(f"{p.name}:\n{p.read_text()}" for p in sorted(out.glob("rank*.log")))
            pytest.fail(f"ranks {alive} still running after {JOIN_SECONDS} s (killed); their logs:\n{logs}")


def _log(out: Path, rank: int, event: str) -> None:
    """Progress of a rank, read by the test (what it checked) and shown if the ranks time out."""
    with open(out / f"rank{rank}.log", "a", encoding="utf-8") as file:
        file.write(f"{time.strftime('%H:%M:%S')} {event}\n")


def _init(rank: int, store: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", store=dist.FileStore(store, WORLD), rank=rank, world_size=WORLD, timeout=TIMEOUT
    )


def _finish() -> None:
    """Both ranks done with gloo, then leave without interpreter teardown (see the module docstring)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _nonzero_gates(model, seed: int = 1):
    """Non-zero gates, so that the prefix tokens get gradients from the first step."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in aligner.aligner_parameters(model).items():
            if name.startswith("gate"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(100 * step + rank))


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in aligner.aligner_parameters(model).values()])


def _all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist

    copies = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(copies, tensor)
    return copies


# --------------------------------------------------------------------------------------------
# DDP: gradients averaged, ranks identical


def _ddp(rank: int, out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = _nonzero_gates(aligner.patch(tiny_model(**MODEL), num_tokens=2))
    params = aligner.aligner_parameters(model)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(list(params.values()), lr=0.05)
    for step in range(3):
        ids = _batch(step, rank)
        with ddp.no_sync():  # this rank's own gradient, not averaged
            ddp(input_ids=ids, labels=ids).loss.backward()
        local = {name: param.grad.clone() for name, param in params.items()}
        optimizer.zero_grad()
        ddp(input_ids=ids, labels=ids).loss.backward()  # DDP all-reduces (averages) the gradients
        for name, param in params.items():
            gathered = _all_gather(local[name])
            assert gathered[0].abs().sum() > 0 and not torch.equal(gathered[0], gathered[1]), name
            torch.testing.assert_close(param.grad, sum(gathered) / WORLD, rtol=1e-5, atol=1e-7)
        optimizer.step()
        optimizer.zero_grad()
    copies = _all_gather(_flat(model))
    assert torch.equal(copies[0], copies[1]), "Aligner weights differ between ranks"
    _log(out, rank, "ddp: gradients averaged, ranks identical")


# --------------------------------------------------------------------------------------------
# FSDP2: patch, train, save and load on a sharded model


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _fsdp(rank: int, out: Path) -> None:
    from torch.distributed.tensor import DTensor

    from aligner.training.trainer import AlignerTrainer

    # Reference: the same model, unsharded, trained on the global batch (both ranks' rows).
    reference = _nonzero_gates(aligner.patch(tiny_model(**MODEL), num_tokens=2))
    # patch first, then shard: FSDP2 then owns the Aligner's parameters and reduces their gradients.
    model = _shard(_nonzero_gates(aligner.patch(tiny_model(**MODEL), num_tokens=2)))
    params = aligner.aligner_parameters(model)
    assert all(isinstance(p, DTensor) for p in params.values()), "FSDP2 did not shard the Aligner"
    optimizers = [
        torch.optim.AdamW(list(aligner.aligner_parameters(m).values()), lr=0.05) for m in (model, reference)
    ]
    for step in range(3):
        ids = _batch(step, rank)
        model(input_ids=ids, labels=ids).loss.backward()  # FSDP2 averages over the ranks' equal batches
        both = torch.cat([_batch(step, r) for r in range(WORLD)])
        reference(input_ids=both, labels=both).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    trained = out / "trained"
    aligner.save(model, trained)  # gathers the shards: a collective, every rank calls it
    # The Trainer's save_model on a sharded model: only rank 0 "should save", yet every rank must
    # gather (the main process alone would hang); the result is the same Aligner.
    trainer = SimpleNamespace(
        args=SimpleNamespace(should_save=rank == 0, output_dir=str(out / "by-trainer")),
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
        model=model,
    )
    AlignerTrainer.save_model(trainer)
    _all_gather(torch.zeros(1))  # both ranks have written before anyone reads
    by_trainer, direct = _weights(out / "by-trainer"), _weights(trained)
    assert by_trainer.keys() == direct.keys()
    assert all(torch.equal(by_trainer[name], direct[name]) for name in direct)
    saved = aligner.load(tiny_model(**MODEL), trained)
    for name, param in aligner.aligner_parameters(reference).items():
        torch.testing.assert_close(aligner.aligner_parameters(saved)[name], param, rtol=1e-4, atol=1e-6)

    ids = _batch(7, rank)
    expected = saved(input_ids=ids).logits
    # load, then shard (the order for fine-tuning a saved Aligner further) ...
    loaded_first = _shard(aligner.load(tiny_model(**MODEL), trained))
    torch.testing.assert_close(loaded_first(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    # ... or load into an already sharded, patched model: each rank copies in its own shard.
    sharded = _shard(aligner.patch(tiny_model(**MODEL), num_tokens=2))
    aligner.load(sharded, trained)
    torch.testing.assert_close(sharded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    _log(out, rank, "fsdp2: trained like unsharded, saved, loaded")


# --------------------------------------------------------------------------------------------
# One spawn of two ranks runs both checks (each rank pays the transformers import once); a
# failing check ends its rank, and the join reports that rank's traceback.


def _rank(rank: int, store: str, out: str, deadline: float) -> None:
    import faulthandler

    out = Path(out)
    _log(out, rank, "started")
    # If this rank hangs, its threads' stacks land in its log shortly before the test kills it.
    stacks = open(out / f"rank{rank}.log", "a", encoding="utf-8")  # noqa: SIM115 - open until os._exit
    faulthandler.dump_traceback_later(max(1.0, deadline - time.time() - 15), file=stacks)
    _init(rank, store)
    _log(out, rank, "gloo process group up")
    _ddp(rank, out)
    _fsdp(rank, out)
    _finish()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, reaper) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    _run_ranks(_rank, reaper, out)
    return out


def test_ddp_averages_gradients_and_keeps_ranks_identical(two_ranks):
    for rank in range(WORLD):
        assert "ddp: gradients averaged, ranks identical" in (two_ranks / f"rank{rank}.log").read_text()


def test_fsdp2_patch_train_save_load(two_ranks):
    """Sharded with ``fully_shard`` (FSDP2) on CPU/gloo: training equals unsharded training on the
    global batch; ``save`` gathers the shards; ``load`` works before or after sharding."""
    for rank in range(WORLD):
        assert "fsdp2: trained like unsharded, saved, loaded" in (two_ranks / f"rank{rank}.log").read_text()


# --------------------------------------------------------------------------------------------
# `aligner train` under torchrun equals the single-process run with the same global batch


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _cli_rank(dump: str, argv: list[str]) -> int:
    """One rank of ``aligner train`` (``aligner.cli.main``, what ``python -m aligner.cli`` runs);
    afterwards the Aligner this rank holds is saved to ``dump/rank{RANK}`` so that the test can
    compare the ranks (the CLI itself writes from rank 0 only)."""
    from aligner.cli import main
    from aligner.training import AlignerTrainer

    trainers = []
    train = AlignerTrainer.train

    def recording_train(self, *args, **kwargs):
        trainers.append(self)
        return train(self, *args, **kwargs)

    AlignerTrainer.train = recording_train
    code = main(argv)
    if code == 0:
        model = trainers[0].accelerator.unwrap_model(trainers[0].model)
        aligner.save(model, Path(dump) / f"rank{os.environ['RANK']}")
    return code


def _losses(output_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "aligner_model.safetensors")


def test_cli_torchrun_two_ranks_equals_one_process(tmp_path, reaper):
    """Why the two runs must agree to float precision: the data file holds exactly one global batch
    (4 rows: batch 4 in one process, 2 per rank on two), so every step sees the same rows whatever
    order the samplers draw; the tiny LLaMA has no dropout (attention_dropout 0); the
    Trainer divides each rank's summed loss by the label tokens of the whole global batch
    (average_tokens_across_devices), so DDP's gradient average is the single process's gradient;
    both start from the same saved Aligner (non-zero gates, so every parameter learns from step 1).
    What remains is summation order (per-rank padding, the all-reduce)."""
    pytest.importorskip("datasets", reason="needs the train extra: pip install -e '.[train]'")
    from test_training import ALPACA_ROWS, write_jsonl
    from transformers import AutoModelForCausalLM

    from aligner.cli import main

    model_dir = save_tiny_model(tmp_path / "model")
    start = aligner.save(
        _nonzero_gates(aligner.patch(AutoModelForCausalLM.from_pretrained(model_dir), num_tokens=2)),
        tmp_path / "start",
    )
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    assert len(ALPACA_ROWS) == 4
    common = ["train", str(model_dir), "--data", str(data), "--init-aligner", str(start), "--lr", "0.05",
              "--max-steps", "3", "--logging-steps", "1", "--save-steps", "100", "--no-progress"]  # fmt: skip

    assert main([*common, "--output-dir", str(tmp_path / "one"), "--batch-size", "4"]) == 0

    port = _free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--max-restarts", "0",
        __file__, str(tmp_path / "dump"), *common, "--output-dir", str(tmp_path / "two"), "--batch-size", "2",
    ]  # fmt: skip
    root = Path(__file__).resolve().parent
    path = os.pathsep.join([str(root.parent), str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    # Its own session (so the whole group, ranks included, can be killed) and no stdin (pytest-xdist
    # talks to its workers over stdin/stdout).
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, start_new_session=True,
    )  # fmt: skip
    reaper(process)
    try:
        output, _ = process.communicate(timeout=TORCHRUN_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish in {TORCHRUN_SECONDS} s (killed):\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    assert output.count("done: 3 steps") == 1, f"one summary (rank 0's), not one per rank:\n{output[-3000:]}"

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [step for step, _ in two] == [1, 2, 3], "rank 0 alone writes metrics.jsonl, one line per step"
    assert [step for step, _ in one] == [1, 2, 3]
    for (_, loss_one), (_, loss_two) in zip(one, two):
        assert loss_two == pytest.approx(loss_one, rel=1e-6)
    assert one[-1][1] < one[0][1], "the loss went down"

    ranks = [_weights(tmp_path / "dump" / f"rank{rank}") for rank in range(WORLD)]
    saved, single, initial = (_weights(tmp_path / name) for name in ("two", "one", "start"))
    for name, tensor in saved.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between the ranks"
        assert torch.equal(ranks[0][name], tensor), f"{name}: the saved Aligner is not rank 0's"
        assert not torch.equal(tensor, initial[name]), f"{name} did not train"
        torch.testing.assert_close(tensor, single[name], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":  # one rank of the CLI test, started by torchrun: DUMP_DIR, then aligner's argv
    sys.exit(_cli_rank(sys.argv[1], sys.argv[2:]))
