"""Two ranks under torchrun (gloo on the CPU, nano pretraining): a fault on ONE rank stops every rank cleanly (issue
18, D11: SIGTERM saves and exits everywhere; D12: a frozen or killed rank ends the others within --ddp_timeout with
one clear line), resume is exact on every rank, DeepSpeed ZeRO-1/2 train what DDP trains, the multi-node launch
trains what a single node does, and absurd numeric flags are argparse errors (D16).

The runs use a constant learning rate after one warmup step, so a run of any length shares its first steps with a
longer one, and dropout, so each rank's own RNG state must survive a resume. The harness (Launch: torchrun in the
background, its ranks signalled by pid) is the one the fault sweep runs (scripts/sweeps/distributed.py)."""
import contextlib
import os
import signal

import psutil
import pytest
import torch

import train_pretrain
from model.training.runtime import Runtime, explain_collective_failures
from scripts.sweeps.distributed import Launch, free_port, losses, pretrain_args, zero_config

BOUND = 90  # seconds every rank gets to exit after a fault; a clean exit takes a few, a hang forever


def run(work, steps, extra=(), nproc=2, env=None) -> Launch:
    launch = Launch("train_pretrain.py", pretrain_args(str(work), steps, extra), nproc=nproc, env=env)
    status = launch.wait(timeout=600)
    launch.close()
    assert status == 0, launch.text[-3000:]
    return launch


def sigterm_one_rank(work, extra=(), rank=1) -> int:
    """Start a long run, SIGTERM one rank's process after step 3; every rank must save and exit (143) within BOUND
    (before the fix the signalled rank saved and waited at a barrier while the other waited in the next step's
    all-reduce: both alive for good). Returns the step of the resume checkpoint."""
    launch = Launch("train_pretrain.py", pretrain_args(str(work), 100000, ["--save_interval", "1000", *extra]))
    try:
        assert launch.wait_for(r"^step 3/", timeout=300), launch.text[-3000:]
        launch.signal_rank(rank, signal.SIGTERM)
        status = launch.wait(timeout=BOUND)
        assert status is not None, f"still running {BOUND} s after SIGTERM to rank {rank}: {launch.text[-2000:]}"
    finally:
        launch.close()
    # Rank 0 prints this after the save's barrier, so the other rank was in the save too.
    saved = launch.wait_for(r"SIGTERM: resume checkpoint written at step (\d+).*signalled: 1 of 2 ranks", 0)
    assert saved, launch.text[-3000:]
    return int(saved.group(1))


def assert_same_weights(a, b, exact=True):
    expected, got = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for key in expected:
        if exact:
            assert torch.equal(expected[key], got[key]), key
        else:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


# ---- D11: SIGTERM to one rank -------------------------------------------------------------------------------------
def test_sigterm_to_one_rank_saves_and_stops_every_rank(tmp_path):
    """The quick one (one launch): the resume checkpoint holds the step every rank stopped at. Resuming from it is
    the slow test below."""
    saved = sigterm_one_rank(tmp_path)
    assert torch.load(tmp_path / "out" / "pretrain_64_resume.pth", weights_only=True)["train_state"]["step"] == saved


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero1", "zero2"])
def test_sigterm_then_resume_reproduces_the_uninterrupted_run(engine, tmp_path):
    """After a SIGTERM to one rank (rank 0 for ZeRO-1, rank 1 otherwise), resuming gives the uninterrupted run's
    losses and final weights, bitwise (CPU fp32, same engine). With dropout this needs every rank's own RNG state
    back: the checkpoint used to hold rank 0's only, which every rank then restored. Under DeepSpeed the checkpoint
    directory keeps only the tag `latest` names."""
    extra = ["--deepspeed", zero_config(str(tmp_path), int(engine[-1]))] if engine != "ddp" else []
    steps = 14
    run(tmp_path / "whole", steps, extra)
    saved = sigterm_one_rank(tmp_path / "split", extra, rank=0 if engine == "zero1" else 1)
    assert saved < steps - 2, "the run went past the comparison window before stopping (machine too loaded?)"
    run(tmp_path / "split", steps, ["--from_resume", "1", *extra])
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert [split[s] for s in range(saved + 1, steps + 1)] == [whole[s] for s in range(saved + 1, steps + 1)]
    assert_same_weights(tmp_path / "whole" / "out" / "pretrain_64.pth", tmp_path / "split" / "out" / "pretrain_64.pth")
    if engine != "ddp":
        tags = sorted(os.listdir(tmp_path / "split" / "out" / "pretrain_64_resume_ds"))
        assert [t for t in tags if t.startswith("step")] == [f"step{steps}"], tags


# ---- D12: a rank that froze or died -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("engine, fault", [("ddp", "sigstop"), ("ddp", "sigkill"), ("zero2", "sigstop")])
def test_a_frozen_or_killed_rank_ends_the_others_with_one_clear_line(engine, fault, tmp_path):
    """SIGSTOP (frozen: the others wait --ddp_timeout, 5 s here, instead of gloo's 30 minutes) or SIGKILL (dead: its
    connections close at once) on rank 1: rank 0 exits within the bound, saying which it most likely was. The
    stopped process is SIGKILLed in cleanup (torchrun itself would wait 30 s for it to honour SIGTERM). Under ZeRO
    the reductions run in a group DeepSpeed makes itself, which got torch's 30-minute default before."""
    extra = ["--deepspeed", zero_config(str(tmp_path), 2)] if engine == "zero2" else []
    launch = Launch("train_pretrain.py", pretrain_args(str(tmp_path), 100000, ["--ddp_timeout", "5", *extra]))
    try:
        assert launch.wait_for(r"^step 3/", timeout=300), launch.text[-3000:]
        ranks = launch.ranks()
        ranks[1].send_signal(signal.SIGSTOP if fault == "sigstop" else signal.SIGKILL)
        ranks[0].wait(timeout=BOUND)  # raises psutil.TimeoutExpired if rank 0 hangs
        with contextlib.suppress(psutil.NoSuchProcess):
            ranks[1].kill()
        assert launch.wait(timeout=BOUND) is not None, launch.text[-2000:]
    finally:
        launch.close()
    cause = "waited --ddp_timeout 5s for the other ranks in a collective: a rank froze" if fault == "sigstop" else \
        "lost its connection while waiting for the other ranks in a collective: a rank died"
    assert f"error: rank 0 {cause}" in launch.text, launch.text[-3000:]


@pytest.mark.parametrize("raised, said", [
    ("[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation",
     "error: rank 1 waited --ddp_timeout 5s for the other ranks in a collective: a rank froze"),
    ("[third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:2269: Connection reset by peer",
     "error: rank 1 lost its connection while waiting for the other ranks in a collective: a rank died"),
])
def test_a_failed_collective_is_one_line_naming_the_likely_cause(raised, said, capsys):
    """The quick one: gloo's two errors (as torch 2.13 words them) become one line; other errors pass through."""
    runtime = Runtime(torch.device("cpu"), torch.float32, rank=1, world_size=2, ddp_timeout=5)
    with pytest.raises(SystemExit) as exit_info, explain_collective_failures(runtime):
        raise RuntimeError(raised)
    assert exit_info.value.code == 1
    assert said in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="shape mismatch"), explain_collective_failures(runtime):
        raise RuntimeError("shape mismatch")


# ---- DeepSpeed ZeRO-1/2 against DDP -------------------------------------------------------------------------------
def assert_same_run(reference, other, steps: int):
    """Every step's loss and the final weights agree to float rounding: rtol 1e-5 on the losses, 1e-4 on the
    weights. The runs differ only in summation order (ZeRO sums the squared gradients of its flat partitions for the
    clipping norm, active at every step here; one process averages 8 losses where two average 4 each): measured
    1.2e-7 relative at most on the losses, 1 float32 ulp, so 1e-5 leaves a margin of 100. A real difference (a wrong
    rate, a gradient not averaged over the ranks, a micro-batch skipped) moves the loss by 1e-3 or more from the
    second step on."""
    expected, got = losses(reference), losses(other)
    assert sorted(expected) == sorted(got) == list(range(1, steps + 1))
    assert got == pytest.approx(expected, rel=1e-5)
    assert_same_weights(reference / "out" / "pretrain_64.pth", other / "out" / "pretrain_64.pth", exact=False)


def test_zero2_on_two_ranks_trains_what_one_process_does(tmp_path):
    """The quick one (one launch): ZeRO-2 on 2 ranks x 4 sequences against one process x 8 (the same 8 sequences
    per step: the sampler deals rank r every other one of the same shuffled order; dropout off, as its masks come
    from per-rank RNGs). DeepSpeed must not compile its shared-memory all-reduce kernel (98 s of g++ here on a
    fresh machine, CI's every run): training never uses it."""
    steps, no_dropout = 6, ["--dropout", "0"]
    train_pretrain.main(pretrain_args(str(tmp_path / "one"), steps, [*no_dropout, "--batch_size", "8"]))
    extensions = tmp_path / "torch_extensions"
    zero = run(tmp_path / "zero", steps, [*no_dropout, "--deepspeed", zero_config(str(tmp_path), 2)],
               env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert "ranks in sync: yes" in zero.text
    assert_same_run(tmp_path / "one", tmp_path / "zero", steps)
    assert not extensions.exists(), os.listdir(extensions)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_trains_what_ddp_trains(stage, tmp_path):
    """Same data, same flags (dropout on: both engines draw the same masks from the same per-rank RNGs), 2 ranks."""
    steps = 6
    run(tmp_path / "ddp", steps)
    run(tmp_path / "zero", steps, ["--deepspeed", zero_config(str(tmp_path), stage)])
    assert_same_run(tmp_path / "ddp", tmp_path / "zero", steps)


# ---- multi-node launch --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_node_launch_trains_what_one_node_does(tmp_path):
    """`torchrun --nnodes 2 --node_rank {0,1} --rdzv_backend c10d --rdzv_endpoint HOST:PORT`, both "nodes" on
    127.0.0.1 with one process each: both finish, and the losses equal a single-node 2-process run's (the logged loss
    is the mean over ranks and a sum of two gradients is the same in either order, so which launcher's process
    becomes rank 0 does not matter)."""
    steps = 5
    run(tmp_path / "one_node", steps)
    endpoint = f"127.0.0.1:{free_port()}"
    args = pretrain_args(str(tmp_path / "two_nodes"), steps)
    nodes = [Launch("train_pretrain.py", args, torchrun_args=[
        "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--rdzv_backend", "c10d",
        "--rdzv_endpoint", endpoint, "--rdzv_id", "tinymind_test"]) for node in (0, 1)]
    try:
        statuses = [node.wait(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            node.close()
    assert statuses == [0, 0], "\n\n".join(node.text[-2000:] for node in nodes)
    assert "x 2 ranks" in "".join(node.text for node in nodes)
    assert losses(tmp_path / "two_nodes") == losses(tmp_path / "one_node")


# ---- D16: numeric flags -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, why", [
    ("--learning_rate", "1e39", "must be <= 1.0"), ("--learning_rate", "0", "must be > 0.0"),
    ("--learning_rate", "nan", "is not a finite number"), ("--learning_rate", "inf", "is not a finite number"),
    ("--batch_size", "0", "must be >= 1"), ("--accumulation_steps", "-2", "must be >= 1"),
    ("--save_interval", "0", "must be >= 1"), ("--log_interval", "0", "must be >= 1"),
    ("--grad_clip", "-1", "must be >= 0.0"), ("--weight_decay", "1e39", "must be <= 1.0"),
    ("--min_lr_ratio", "2", "must be <= 1.0"), ("--max_seq_len", "1", "must be >= 2"),
    ("--dropout", "1", "must be <= 0.99"), ("--ddp_timeout", "0", "must be > 0.0"),
    ("--seed", "-1", "must be >= 0"), ("--eval_batches", "0", "must be >= 1"),
    ("--val_fraction", "1.5", "must be <= 0.99"), ("--batch_size", "2.5", "'2.5' is not an integer"),
])
def test_absurd_numeric_flags_are_argparse_errors(flag, value, why, capsys):
    """Before, --learning_rate 1e39 crashed deep in the optimizer with an overflow traceback, a zero interval with a
    ZeroDivisionError; now each is a usage error (exit status 2) naming the flag."""
    with pytest.raises(SystemExit) as exit_info:
        train_pretrain.parse_args([flag, value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}: " in error and why in error, error


def test_sane_numeric_flags_still_parse():
    args = train_pretrain.parse_args(["--learning_rate", "3e-4", "--batch_size", "1", "--max_steps", "-1",
                                      "--grad_clip", "0", "--ddp_timeout", "60", "--dropout", "0"])
    assert (args.learning_rate, args.batch_size, args.ddp_timeout, args.grad_clip) == (3e-4, 1, 60.0, 0.0)
