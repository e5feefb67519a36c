"""Peak memory and time of one training step's loss at M2M-124 615M's output shape, train.loss plain vs chunked.

    PYTHONPATH=. python benchmarks/lean_loss_step.py [plain:0 chunked:67108864 chunked:16777216]

The step: a frozen output projection (V 256,125 x d 1024, as under LSLo) after a small trainable layer, 2,000
target tokens, label smoothing 0.2, backward, Adam. Each loss runs twice in a fresh process; the peak is that
process's VmHWM (peak resident memory, /proc/self/status), next to its VmHWM before the first step (weights and
inputs). Step times are wall-clock seconds of both steps; they depend on the machine and its load.
"""

import json
import subprocess
import sys
import time

D_MODEL, VOCAB, TOKENS = 1024, 256_125, 2000


def peak_gib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 2**20


def one_process(kind: str, chunk_elements: int) -> dict:
    import torch
    import torch.nn.functional as F

    from lslo.lean_loss import chunked_label_smoothed_nll_loss
    from lslo.train import label_smoothed_nll_loss

    torch.manual_seed(0)
    weight = torch.randn(VOCAB, D_MODEL).mul_(0.02)  # in place: no second V x d tensor in the baseline peak
    layer = torch.nn.Linear(D_MODEL, D_MODEL)
    x, target = torch.randn(TOKENS, D_MODEL), torch.randint(0, VOCAB, (TOKENS,))
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-4)
    before, seconds = peak_gib(), []
    for _ in range(2):
        start = time.perf_counter()
        hidden = layer(x)
        if kind == "plain":
            loss = label_smoothed_nll_loss(F.linear(hidden, weight), target, 0.2)[0]
        else:
            loss = chunked_label_smoothed_nll_loss(hidden, weight, target, 0.2, chunk_elements=chunk_elements)[0]
        (loss / TOKENS).backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(round(time.perf_counter() - start, 1))
    return {"loss": kind, "chunk_elements": chunk_elements, "value": loss.item(), "baseline_gib": round(before, 2),
            "peak_gib": round(peak_gib(), 2), "step_s": seconds, "threads": torch.get_num_threads()}


def main(runs: list[str]) -> None:
    rows = []
    for run in runs:
        kind, chunk = run.split(":")
        out = subprocess.run([sys.executable, __file__, "--child", kind, chunk], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    plain = next((row for row in rows if row["loss"] == "plain"), None)
    if plain is not None:
        for row in rows:
            print(f"{row['loss']} {row['chunk_elements']}: peak {row['peak_gib'] / plain['peak_gib']:.2f} x plain's, "
                  f"peak above baseline {(row['peak_gib'] - row['baseline_gib']) / (plain['peak_gib'] - plain['baseline_gib']):.2f} x, "  # noqa: E501
                  f"step time {row['step_s'][-1] / plain['step_s'][-1]:.2f} x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(one_process(sys.argv[2], int(sys.argv[3]))))
    else:
        main(sys.argv[1:] or ["plain:0", "chunked:67108864", "chunked:16777216"])
