"""Which merge method keeps most of each task, and what the core-space methods cost against dense code.

    python benchmarks/bench_merge_quality.py [--tasks 4 --rank 8 --seeds 3] [--plot benchmarks/merge_quality.png]
        [--cost-dense iso_c,ties] [--no-cost]

Quality (the task-vector setting of the merging papers: a shared backbone, one frozen head per task): an MLP is
trained here on a generic task over the inputs of T synthetic tasks (task t: inputs around their own centre,
labels from their own random teacher); each task gets a linear-probe head on the frozen base, then one PEFT LoRA
on the backbone (rank r on fc1-fc3, head frozen; trained here, saved with save_pretrained and read back with
adaptools.load). Every method of
`adaptools combine` merges the T adapters (weights 1, each with and without `--calibrate pico`); the merged update
times α is added to the base weights, α chosen per method from ALPHAS on a validation split (the papers'
protocol; α = 1 is reported too), and each task's test accuracy is divided by that of its own LoRA (normalized
accuracy, 1 = nothing lost). Means over `--seeds` runs (new data, base and adapters per seed).

Cost: a Llama-7B layer group (q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008), T = 4 rank-16 adapters.
Core-space methods run on the whole group (one combine call, timed after a warm-up); the dense implementations
(`--cost-dense`, each timed once per shape, a dense SVD of a 4096x4096 ΔW takes minutes on a busy 2-core CPU) run
the method's full-space definition on the dense ΔW_t: iso_c one SVD of Σ ΔW_t; tsv one SVD per ΔW_t and two
polar SVDs; ties adaptools' dense TIES (trim, elect, disjoint mean on ΔW, refit by randomized SVD), the
full-space form of core_ties. The group's dense time is 4·t(4096x4096) + 3·t(11008x4096).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

import adaptools
from adaptools.device import resolve_device
from timing import timed

METHODS: list[tuple[str, dict]] = [
    ("sum", {}), ("ties", {"density": 0.2}), ("dare_ties", {"density": 0.5}), ("knots_ties", {"density": 0.2}),
    ("tsv", {}), ("iso_c", {}), ("iso_cts", {}), ("core_ties", {"density": 0.2}), ("core_dare", {"density": 0.5}),
    ("ctm", {"density": 0.2}),
]
TARGETS = ["fc1", "fc2", "fc3"]
ALPHAS = (0.1, 0.2, 0.35, 0.5, 0.7, 1.0, 1.4)
"""Scales α of the merged update tried on the validation split (the papers' λ; weights stay 1)."""


class Net(nn.Module):
    """A 3-hidden-layer ReLU MLP classifier."""

    def __init__(self, dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


class Tasks:
    """T classification tasks, each on its own subspace of the inputs: x = P_t·z + noise with P_t a random
    dim x k embedding, labels argmax(W_t·tanh(z)); the generic task (None) draws from all of them with labels of
    its own teacher on x."""

    def __init__(self, count: int, dim: int, classes: int, seed: int, width: int = 8, noise: float = 0.3) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.embeddings = torch.linalg.qr(torch.randn(count, dim, width, generator=self.g)).Q
        self.teachers = torch.randn(count, classes, width, generator=self.g)
        self.generic = torch.randn(classes, dim, generator=self.g)
        self.noise = noise

    def sample(self, task: int | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples of `task` (None: the generic task on inputs of all tasks)."""
        count, dim, width = self.embeddings.shape
        which = torch.randint(count, (n,), generator=self.g) if task is None else torch.full((n,), task)
        z = 2 * torch.randn(n, width, generator=self.g)
        x = (self.embeddings[which] @ z.unsqueeze(-1)).squeeze(-1) + self.noise * torch.randn(n, dim, generator=self.g)
        if task is None:
            return x, (torch.tanh(x) @ self.generic.T).argmax(1)
        return x, (torch.tanh(z) @ self.teachers[task].T).argmax(1)


def train(model: nn.Module, tasks: Tasks, task: int | None, steps: int, lr: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        x, y = tasks.sample(task, 256)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).float().mean())


def with_update(base: Net, adapter: adaptools.Adapter, alpha: float = 1.0) -> Net:
    """A copy of `base` with every module's α·ΔW added to its weight."""
    model = copy.deepcopy(base)
    state = model.state_dict()
    for name, module in adapter.items():
        state[f"{name}.weight"] += alpha * module.delta().to(state[f"{name}.weight"].dtype)
    model.load_state_dict(state)
    return model


def quality_run(args: argparse.Namespace, seed: int, folder: Path) -> dict[str, list[float]]:
    """{label: normalized accuracy per task} for one seed."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    tasks = Tasks(args.tasks, args.dim, args.classes, seed)
    base = Net(args.dim, args.hidden, args.classes)
    train(base, tasks, None, args.base_steps, 3e-3)
    tests = [tasks.sample(t, 4000) for t in range(args.tasks)]
    valid = [tasks.sample(t, 2000) for t in range(args.tasks)]
    heads, adapters = [], []
    for t in range(args.tasks):
        probe = copy.deepcopy(base)  # the task's head: a linear probe on the frozen base
        for name, param in probe.named_parameters():
            param.requires_grad = name.startswith("head.")
        train(probe, tasks, t, args.probe_steps, 1e-2)
        heads.append(probe.head)
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)
        model = get_peft_model(probe, config)  # the head stays frozen: only the backbone's LoRA trains
        train(model, tasks, t, args.lora_steps, 3e-3)
        model.save_pretrained(folder / f"s{seed}-t{t}")
        adapters.append(adaptools.load(folder / f"s{seed}-t{t}"))

    def task_accuracy(adapter: adaptools.Adapter | None, t: int, data: list, alpha: float = 1.0) -> float:
        model = copy.deepcopy(base) if adapter is None else with_update(base, adapter, alpha)
        model.head = heads[t]
        return accuracy(model, data[t])

    own = [task_accuracy(a, t, tests) for t, a in enumerate(adapters)]
    own_valid = [task_accuracy(a, t, valid) for t, a in enumerate(adapters)]
    base_row = [task_accuracy(None, t, tests) / own[t] for t in range(args.tasks)]
    rows = {"base (each task's probe head)": (base_row, 0.0, sum(base_row) / args.tasks)}
    for method, options in METHODS:
        if method == "ctm":
            options = {**options, "policy": f"rank={args.rank}"}
        for calibrate in (None, "pico"):
            out = adaptools.combine(adapters, None, method=method, calibrate=calibrate, **options)
            merged = out[0] if isinstance(out, tuple) else out

            def score(alpha: float) -> float:
                return sum(task_accuracy(merged, t, valid, alpha) / own_valid[t] for t in range(args.tasks))

            best = max(ALPHAS, key=score)
            at_one = sum(task_accuracy(merged, t, tests) / own[t] for t in range(args.tasks)) / args.tasks
            label = method + (" + pico" if calibrate else "")
            rows[label] = ([task_accuracy(merged, t, tests, best) / own[t] for t in range(args.tasks)], best, at_one)
    rows["own LoRA (absolute accuracy)"] = (own, 1.0, sum(own) / args.tasks)
    return rows


def quality(args: argparse.Namespace) -> dict[str, tuple[list[float], float, float]]:
    """{label: (normalized test accuracy per task at the chosen α, mean α, average at α = 1)}, means over seeds."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = [quality_run(args, seed, Path(tmp)) for seed in range(args.seeds)]
    table = {}
    for label in runs[0]:
        per_task = [sum(r[label][0][t] for r in runs) / len(runs) for t in range(args.tasks)]
        table[label] = (per_task, sum(r[label][1] for r in runs) / len(runs), sum(r[label][2] for r in runs) / len(runs))
    print(f"\nNormalized accuracy (merged / own LoRA), T = {args.tasks}, rank {args.rank}, mean of {args.seeds} seeds;"
          " α chosen per method on a validation split")
    print("| method | " + " | ".join(f"task {t}" for t in range(args.tasks)) + " | average | α | average at α = 1 |")
    print("|---|" + "---|" * (args.tasks + 3))
    for label, (values, alpha, at_one) in table.items():
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values)
              + f" | **{sum(values) / len(values):.3f}** | {alpha:.2f} | {at_one:.3f} |")
    return table


def plot(table: dict[str, tuple[list[float], float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m, _ in METHODS]
    x = torch.arange(len(methods)).numpy()
    fig, ax = plt.subplots(figsize=(11, 4.5))
    bars = [("tuned α", lambda label: sum(table[label][0]) / len(table[label][0])),
            ("α = 1", lambda label: table[label][2])]
    for i, (how, value) in enumerate(bars):
        for j, suffix in enumerate(("", " + pico")):
            offset = (2 * i + j - 1.5) * 0.2
            ax.bar(x + offset, [value(m + suffix) for m in methods], 0.2, label=f"method{suffix}, {how}",
                   color=f"C{2 * i + j}")
    base = table["base (each task's probe head)"][0]
    ax.axhline(sum(base) / len(base), color="gray", linewidth=0.8, linestyle="--", label="base, no adapter")
    ax.set_ylim(0, 1)
    ax.set_xticks(x, methods, rotation=20)
    ax.set_ylabel("normalized accuracy (mean over tasks)")
    ax.set_title("Merging T synthetic-task LoRAs: accuracy kept per method")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# --------------------------------------------------------------------------- cost


LAYER = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
         "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}


def polar(X: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def dense_iso_c(taus: list[torch.Tensor]) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(sum(taus), full_matrices=False)
    return S.mean() * U @ Vh


def dense_tsv(taus: list[torch.Tensor]) -> torch.Tensor:
    k = min(taus[0].shape) // len(taus)
    parts = [torch.linalg.svd(t, full_matrices=False) for t in taus]
    U = torch.cat([u[:, :k] for u, _, _ in parts], 1)
    S = torch.cat([s[:k] for _, s, _ in parts])
    V = torch.cat([vh[:k].T for _, _, vh in parts], 1)
    return polar(U) @ torch.diag(S) @ polar(V).T


def random_adapters(count: int, rank: int, shapes: dict[str, tuple[int, int]]) -> list[adaptools.Adapter]:
    g = torch.Generator().manual_seed(0)
    return [adaptools.Adapter({name: adaptools.LoraModule(A=torch.randn(rank, n, generator=g) / n**0.5,
                                                          B=torch.randn(m, rank, generator=g) / rank, scale=2.0)
                               for name, (m, n) in shapes.items()}) for _ in range(count)]


def cost(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    adapters = random_adapters(4, 16, LAYER)
    print(f"\nCost per 7B layer group (4 x 4096x4096, 2 x 11008x4096, 4096x11008), T = 4, r = 16, device {device}")
    core: dict[str, float] = {}
    for method, options in METHODS[4:]:
        options = {**options, "policy": "rank=16"} if method == "ctm" else options
        run = lambda: adaptools.combine(adapters, None, method=method, device=device, **options)  # noqa: E731
        run()  # warm-up
        core[method], _ = timed(run, device)
        print(f"core {method}: {core[method]:.2f} s per layer group")
    dense = {"iso_c": dense_iso_c, "tsv": dense_tsv}
    for method in [m for m in args.cost_dense.split(",") if m]:
        per_shape = {}
        for shape in ((4096, 4096), (11008, 4096)):
            name = next(n for n, s in LAYER.items() if s == shape)
            if method == "ties":
                single = [a.with_modules({name: a[name]}) for a in adapters]
                seconds, _ = timed(lambda: adaptools.combine(single, None, method="ties", density=0.2, device=device),
                                   device)
            else:
                taus = [a[name].delta().to(device) for a in adapters]
                seconds, _ = timed(lambda: dense[method](taus), device)
            per_shape[shape] = seconds
            print(f"dense {method} on {shape[0]}x{shape[1]}: {seconds:.1f} s per module")
        group = 4 * per_shape[(4096, 4096)] + 3 * per_shape[(11008, 4096)]
        against = "core_ties" if method == "ties" else method
        print(f"dense {method}: {group:.0f} s per layer group; core {against} {core[against]:.2f} s: "
              f"{group / core[against]:.0f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--base-steps", type=int, default=1500)
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--lora-steps", type=int, default=600)
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent / "merge_quality.png")
    parser.add_argument("--cost-dense", default="iso_c,ties",
                        help="Dense implementations to time (iso_c, tsv, ties); empty for none.")
    parser.add_argument("--no-cost", action="store_true")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if not args.no_quality:
        plot(quality(args), args.plot)
    if not args.no_cost:
        cost(args)


if __name__ == "__main__":
    main()
