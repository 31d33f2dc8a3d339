"""Write the small reference fixtures in tests/fixtures/reference with the reference's own code.

    REF_REPO=/path/to/TinyRecursiveModels python scripts/make_reference_fixtures.py

REF_REPO is a checkout of the PyTorch project jhspaybar/TinyRecursiveModels (these were made from
commit e2c9dc7); run this with a Python that has torch (CPU is fine), pydantic, einops and pyyaml.
Nothing of the reference is re-implemented here: for each of the four reference families (flat,
dense TRM + ACT, TRM + MoEUT, MoEUT + ACT) the reference's own ``pretrain_text.create_model``
builds the model from its own ``config/arch`` yaml (at reduced width, vocabulary and length, so
the four fit in well under 2 MB), ``pretrain_text.train`` runs three training steps on random
batches, ``pretrain_text.save_checkpoint`` writes ``step_0.pt`` and ``step_3.pt``,
``generate_stories._load_model`` loads ``step_3.pt`` and ``generate_stories.generate_story`` makes
the greedy continuation. Forward hooks only record what the reference computes.

Each folder holds ``step_0.pt``, ``step_3.pt`` (exactly what the reference's trainer writes) and
``expected.npz`` (all from ``step_3.pt``, eval mode, fresh carry; N = halt_max_steps):
``eval_inputs`` [2,T] random ids (row 1 padded with 0 at the end), ``positions`` [16],
``logits`` [N,2,16,V] at those positions after ACT step 1..N, ``z_H`` [N,2,T,H] (the
readout's input at every position; ``z_L`` is left out to keep the files small),
``argmax``/``logsumexp`` [N,2,T], ``q_halt``/``q_continue`` [N,2], ``greedy_prompt``,
``greedy_continuation`` and ``greedy_top2_margin`` (temperature 0, top_k 10, EOS id 0),
``train_inputs``/``train_labels`` [3,2,T], ``train_losses`` [3,3] (total before the reference's
division by the batch size, lm, q_halt), ``train_moe_reg`` [3], ``train_lr`` [3],
``train_halted``/``train_act_steps`` [3,2], and for MoE layer 0's first routing call
``moe_ff_topk_l0``, ``moe_ff_logits_l0``, ``moe_att_{v,o}_topk_l0``, ``moe_att_{v,o}_logits_l0``.
The tests also use the full-size fixtures (vocabulary 10000, seq_len 512) when a folder of them
is given to them (see tests/conftest.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "reference"
ARCHS = ["trm_tinystories_1m_flat", "trm_tinystories_1m", "trm_tinystories_1m_moeut",
         "trm_tinystories_1m_moeut_act"]
V, T, B = 256, 64, 2  # vocabulary, seq_len, batch
SMALL = {"hidden_size": 16, "expansion": 4, "moe_ff_expert_size": 16}  # where the arch has it


def import_reference(ref: str) -> SimpleNamespace:
    """The reference's modules, with the imports it needs only for logging or the hub (hydra,
    wandb, coolname, omegaconf, datasets, transformers) replaced by stand-ins when missing:
    none of them is reached here (wandb disabled, no hub loading)."""
    def no_hub(*args, **kwargs):
        raise RuntimeError("the fixtures never load from a hub")

    stand_ins = {"hydra": {"main": lambda **kw: (lambda fn: fn)}, "wandb": {"init": no_hub},
                 "coolname": {"generate": lambda n: ["ref"] * n},
                 "omegaconf": {"DictConfig": dict, "OmegaConf": None},
                 "datasets": {"load_dataset": no_hub},
                 "transformers": {"AutoTokenizer": SimpleNamespace(from_pretrained=no_hub),
                                  "T5Tokenizer": SimpleNamespace(from_pretrained=no_hub)}}
    for name, attrs in stand_ins.items():
        if importlib.util.find_spec(name) is None:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
    if not os.path.isfile(os.path.join(ref, "pretrain_text.py")):
        raise SystemExit(f"error: REF_REPO={ref} is not a checkout of "
                         "jhspaybar/TinyRecursiveModels (no pretrain_text.py)")
    sys.path.insert(0, ref)
    import generate_stories
    import pretrain_text
    from models.moeut_layers import SigmaMoE, SwitchHeadCore
    from tinystories_dataset import TextDatasetMetadata

    return SimpleNamespace(pt=pretrain_text, gs=generate_stories, SigmaMoE=SigmaMoE,
                           SwitchHeadCore=SwitchHeadCore, Metadata=TextDatasetMetadata)


class IdTokenizer:
    """Stands in for a text tokenizer (pad = eos = 0): a "text" is a list of token ids."""

    vocab_size = V
    pad_token_id = eos_token_id = 0

    def encode(self, ids):
        return [int(i) for i in ids]

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


def pretrain_config(ref, arch: str):
    """PretrainConfig as Hydra composes config/cfg_<arch minus trm_>.yaml with its arch yaml, at
    the small size, 3 steps of batch 2 at a constant lr 1e-3, logging and evaluation off."""
    import yaml

    root = Path(os.environ["REF_REPO"])
    cfg = yaml.safe_load((root / "config" / f"cfg_{arch.removeprefix('trm_')}.yaml").read_text())
    cfg.pop("defaults", None)
    cfg.pop("hydra", None)
    cfg["arch"] = yaml.safe_load((root / "config" / "arch" / f"{arch}.yaml").read_text())
    cfg["arch"].update({k: v for k, v in SMALL.items() if k in cfg["arch"]})
    cfg.update(wandb_mode="disabled", eval_interval_sequences=None,
               checkpoint_interval_sequences=None, checkpoint_path=arch, seq_len=T,
               global_batch_size=B, max_sequences=3 * B, lr=1e-3, lr_min_ratio=1.0,
               lr_warmup_percent=0.0, weight_decay=0.0, seed=0)
    return ref.pt.PretrainConfig(**cfg)


def random_batch(gen, n_pad: int = 0) -> dict:
    """A batch as the reference's loader yields it: ids 1..V-1 over T+1 tokens, the last row
    0-padded from input position T - n_pad; labels = next token, -100 where it is 0."""
    import torch

    tok = torch.randint(1, V, (B, T + 1), generator=gen)
    if n_pad:
        tok[-1, T - n_pad:] = 0
    labels = tok[:, 1:].clone()
    labels[labels == 0] = -100
    return {"inputs": tok[:, :-1].clone(), "labels": labels,
            "dataset_ids": torch.zeros(B, dtype=torch.long),
            "puzzle_identifiers": torch.zeros(B, dtype=torch.long)}


def train_three_steps(ref, config, out: dict) -> None:
    """pretrain_text.train on three random batches; records each step's losses and carry, and
    writes step_0.pt right after the reference builds the model."""
    import torch

    gen = torch.Generator().manual_seed(1)
    batches = [random_batch(gen, n_pad=8) for _ in range(3)]
    log = {k: [] for k in ("losses", "moe_reg", "lr", "halted", "act_steps")}
    metadata = ref.Metadata(pad_id=0, vocab_size=V, seq_len=T)
    create, loader, update_lr = (ref.pt.create_model, ref.pt.create_dataloader,
                                 ref.pt._update_learning_rates)

    def create_and_record(*args, **kwargs):
        model, optimizers, lrs = create(*args, **kwargs)
        act, head_forward, act_forward = model.model, model.forward, model.model.forward

        def act_recorded(*a, **k):
            carry, outputs = act_forward(*a, **k)
            log["moe_reg"].append(float(outputs["moe_reg_loss"].detach()))
            return carry, outputs

        def head_recorded(*a, **k):
            carry, loss, metrics, detached, done = head_forward(*a, **k)
            log["losses"].append([float(loss.detach()), float(metrics["lm_loss"]),
                                  float(metrics["q_halt_loss"])])
            log["halted"].append(carry.halted.tolist())
            log["act_steps"].append(carry.steps.tolist())
            return carry, loss, metrics, detached, done

        act.forward, model.forward = act_recorded, head_recorded
        with contextlib.redirect_stdout(io.StringIO()):
            ref.pt.save_checkpoint(config, SimpleNamespace(model=model, step=0,
                                                           sequences_consumed=0), 0,
                                   config.model_dump())
        return model, optimizers, lrs

    def lr_recorded(cfg, state):
        log["lr"].append(update_lr(cfg, state))
        return log["lr"][-1]

    ref.pt.create_model = create_and_record
    ref.pt.create_dataloader = lambda cfg, split, world_size: (batches, metadata)
    ref.pt._update_learning_rates = lr_recorded
    try:
        ref.pt._seed_everything(config.seed)
        with contextlib.redirect_stdout(io.StringIO()):
            ref.pt.train(config, torch.device("cpu"), 0, 1)
    finally:
        ref.pt.create_model, ref.pt.create_dataloader = create, loader
        ref.pt._update_learning_rates = update_lr
    out["train_inputs"] = np.stack([b["inputs"].numpy() for b in batches]).astype(np.int32)
    out["train_labels"] = np.stack([b["labels"].numpy() for b in batches]).astype(np.int32)
    out["train_losses"] = np.array(log["losses"], np.float64)
    out["train_moe_reg"] = np.array(log["moe_reg"], np.float64)
    out["train_lr"] = np.array(log["lr"], np.float64)
    out["train_halted"] = np.array(log["halted"], bool)
    out["train_act_steps"] = np.array(log["act_steps"], np.int32)


def load_step_3(ref, path: Path):
    """generate_stories._load_model(step_3.pt) on CPU, with the id stand-in as its tokenizer."""
    import torch

    original = ref.gs.get_tokenizer_for_dataset
    ref.gs.get_tokenizer_for_dataset = lambda *a, **k: IdTokenizer()
    try:
        model, _, _ = ref.gs._load_model(path, torch.device("cpu"))
    finally:
        ref.gs.get_tokenizer_for_dataset = original
    return model


def record_routing(ref, model, out: dict) -> None:
    """Hooks on layer 0's MoE modules: their first call's selector logits and top-k choices."""
    import torch.nn.functional as F

    layer = model.model.inner.L_level.layers[0]
    mlp, attn = layer.mlp, layer.self_attn
    mlp_forward, get_sel = mlp.forward, attn.get_sel
    calls = []

    def mlp_recorded(x, sel_input=None):
        result = mlp_forward(x, sel_input)
        if "moe_ff_logits_l0" not in out:
            logits = F.linear(sel_input if sel_input is not None else x, mlp.expert_sel, None)
            out["moe_ff_logits_l0"] = logits.detach().float().numpy()
            out["moe_ff_topk_l0"] = np.sort(mlp.last_topk_indices.numpy(), -1).astype(np.int32)
        return result

    def sel_recorded(t, w, bias=None):
        index, value, raw, probs = get_sel(t, w, bias)
        calls.append((index.numpy().astype(np.int32), raw.detach().numpy()))
        if len(calls) == 2:  # the value selection, then the output selection
            out["moe_att_v_topk_l0"], out["moe_att_v_logits_l0"] = calls[0]
            out["moe_att_o_topk_l0"], out["moe_att_o_logits_l0"] = calls[1]
        return index, value, raw, probs

    mlp.forward, attn.get_sel = mlp_recorded, sel_recorded


def evaluate(ref, model, out: dict, gen) -> None:
    """Every ACT step from a fresh carry on two random rows (row 1 padded at the end)."""
    import torch

    act = model.model
    n = act.config.halt_max_steps
    inputs = torch.randint(1, V, (B, T), generator=gen)
    pad_from = T - 10
    inputs[1, pad_from:] = 0
    others = [int(p) for p in torch.randperm(T - 2, generator=gen)[:40] + 2
              if int(p) not in (T - 1, pad_from - 1, pad_from)][:11]
    positions = np.array([0, 1, T - 1, pad_from - 1, pad_from, *others], np.int32)
    batch = {"inputs": inputs, "labels": inputs.clone(),
             "puzzle_identifiers": torch.zeros(B, dtype=torch.long)}
    steps = {k: [] for k in ("logits", "z_H", "argmax", "logsumexp", "q_halt",
                             "q_continue")}
    if act.config.use_moeut:
        record_routing(ref, model, out)
    with torch.no_grad():
        carry = act.initial_carry(batch)
        for _ in range(n):
            carry, outputs = act(carry=carry, batch=batch)
            logits = outputs["logits"].float()
            steps["logits"].append(logits[:, positions].numpy())
            steps["z_H"].append(carry.inner_carry.z_H.numpy())
            steps["argmax"].append(logits.argmax(-1).numpy().astype(np.int32))
            steps["logsumexp"].append(torch.logsumexp(logits.double(), -1).float().numpy())
            steps["q_halt"].append(outputs["q_halt_logits"].numpy())
            steps["q_continue"].append(outputs["q_continue_logits"].numpy())
    out.update({k: np.stack(v) for k, v in steps.items()})
    out["eval_inputs"], out["positions"] = inputs.numpy().astype(np.int32), positions
    out["eval_row1_pad_from"] = np.array(pad_from, np.int32)


def greedy(ref, model, out: dict, gen, n_new: int = 20) -> None:
    """generate_stories.generate_story, greedy; the top-2 margin behind each id it chose."""
    import torch

    act = model.model
    prompt = [int(t) for t in torch.randint(1, V, (12,), generator=gen)]
    calls = []
    act_forward = act.forward

    def recorded(*a, **k):
        carry, outputs = act_forward(*a, **k)
        calls.append(outputs["logits"][0].detach().clone())
        return carry, outputs

    act.forward = recorded
    text = ref.gs.generate_story(model, IdTokenizer(), prompt, n_new, 0.0, 10,
                                 torch.device("cpu"))
    act.forward = act_forward
    ids = [int(x) for x in text.split()]
    n = act.config.halt_max_steps
    margins = []
    for i in range(len(ids)):
        top2 = torch.topk(calls[(i + 1) * n - 1][len(prompt) + i - 1], 2).values
        margins.append(float(top2[0] - top2[1]))
    out["greedy_prompt"] = np.array(prompt, np.int32)
    out["greedy_continuation"] = np.array(ids, np.int32)
    out["greedy_top2_margin"] = np.array(margins, np.float32)


def make_one(ref, arch: str, out_dir: Path) -> dict:
    import torch

    folder = out_dir / arch
    folder.mkdir(parents=True, exist_ok=True)
    config = pretrain_config(ref, arch)
    out: dict = {}
    cwd = os.getcwd()
    os.chdir(out_dir)  # save_checkpoint writes <checkpoint_path>/step_N.pt, and checkpoint_path
    try:               # (stored in the config) names no path of this machine
        train_three_steps(ref, config, out)
    finally:
        os.chdir(cwd)
    model = load_step_3(ref, folder / "step_3.pt")
    gen = torch.Generator().manual_seed(2)
    evaluate(ref, model, out, gen)
    greedy(ref, model, out, gen)
    np.savez_compressed(folder / "expected.npz", **out)
    return {"arch": arch, "halt_max_steps": int(model.model.config.halt_max_steps),
            "params": sum(p.numel() for p in model.parameters()),
            "train_losses": out["train_losses"].tolist(),
            "greedy_continuation": out["greedy_continuation"].tolist()}


def ref_commit(ref: str) -> str:
    try:
        return subprocess.run(["git", "-C", ref, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ref_dir = os.environ.get("REF_REPO")
    if not ref_dir:
        raise SystemExit("error: set REF_REPO to a checkout of jhspaybar/TinyRecursiveModels")
    import torch

    torch.set_num_threads(1)  # the reference gives the same numbers on 1 or 2 threads
    ref = import_reference(os.path.abspath(ref_dir))
    made = [make_one(ref, arch, args.out) for arch in args.archs]
    meta = {"ref_commit": ref_commit(ref_dir), "torch": torch.__version__, "vocab_size": V,
            "seq_len": T, "batch": B, "small": SMALL, "seed": 0, "fixtures": made}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
