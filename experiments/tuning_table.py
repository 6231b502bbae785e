"""One table and one bits-per-byte plot over every run of a tuning session (issue 11).

    python experiments/tuning_table.py experiments/results/2026-11-30_h200_tuning

The folder holds `guide/<config>/` (the guide's config files, run with `python -m jaxlm.main`) and
sweep folders (`python -m jaxlm.sweep`, each with its sweep.json and point folders). Writes, in that
folder: `results.md` and `results.csv` (one row per run, the sweep table's columns from
`jaxlm.sweep`, plus the vocabulary, since per-token losses of different vocabularies do not compare),
`val_bpb.png` (validation bits per byte per epoch of the runs named in PLOTTED), and, where the
guide's runs still have their TensorBoard events, `guide/val_loss.png` and `guide/train_loss.png`.
"""
import json
import os
import sys

from jaxlm import sweep

# Runs drawn in val_bpb.png: the guide's configs, the round-1 centre and best size, the recipes of
# rounds 2, 5, 6, 8, 11 and 13, the tuned recipe (configs/tuned.py).
PLOTTED = {
    "guide/base": "guide: base.py",
    "guide/lr_5e-4": "guide: lr_5e-4.py",
    "guide/more_capacity": "guide: more_capacity.py",
    "guide/gpu": "guide: gpu.py",
    "r1_reg/dropout=0.3,weight_decay=0.1": "round 1 centre (gpu.py, dropout 0.3, wd 0.1, lr 6e-4)",
    "r1_size/d_model=384,num_layers=8": "round 1: centre with d384 x 8 layers",
    "r2/batch_size=32,learning_rate=0.0006,epochs=16,num_layers=8": "round 2's recipe (+ BPE 4096, 16 epochs)",
    "r5/shift_windows=True,epochs=24,dropout=0.2,weight_decay=0.3":
        "round 5 (+ shifted windows, dropout 0.2, wd 0.3, 24 epochs)",
    "r6/attention_dropout=0.1": "round 6 (+ attention dropout 0.1)",
    "r8/weight_decay=1.0": "round 8 (+ weight decay 1.0, 36 epochs)",
    "r11/ema_decay=0.995,epochs=48": "round 11 (+ weights' moving average 0.995, 48 epochs)",
    "r13/positions=rope": "round 13 (+ rotary positions)",
    "r15/seq_length=512,batch_size=8,learning_rate=0.0012":
        "tuned.py (round 15: + 512-token sequences at batch 8, lr 1.2e-3)",
}


def _cell(column: str, value) -> str:
  """Losses and bits per byte to 4 decimals, perplexities to 1, rates and seconds whole."""
  if isinstance(value, float) and not isinstance(value, bool):
    digits = 4 if column.endswith(("loss", "bpb")) else 1 if "perplexity" in column else 0
    return f"{value:,.{digits}f}"
  return sweep.cell(value)


def run_dirs(root: str) -> list[str]:
  """guide/* in the guide's order, then each sweep's points (sweep folders by name)."""
  out = [os.path.join(root, "guide", c) for c in ("base", "lr_5e-4", "more_capacity", "gpu")
         if os.path.isdir(os.path.join(root, "guide", c))]
  for s in sorted(d.name for d in os.scandir(root) if os.path.exists(os.path.join(d.path, "sweep.json"))):
    out += sorted(d.path for d in os.scandir(os.path.join(root, s))
                  if os.path.exists(os.path.join(d.path, "config.json")))
  return out


def main(root: str) -> None:
  rows = []
  for d in run_dirs(root):
    row = sweep.run_row(d, [])  # the sweep table's columns for one run directory
    row.pop("point")  # its folder's name; the path from `root` names it here
    with open(os.path.join(d, "config.json")) as f:
      config = json.load(f)
    rows.append({"run": os.path.relpath(d, root), "vocab": config["data"]["tokenizer"]["vocab_size"], **row})
  sweep.write_table(root, rows, ["run", "vocab", *sweep.COLUMNS], _cell)

  import matplotlib
  import matplotlib.ticker
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(9, 5.5))
  for run, label in PLOTTED.items():
    epochs = sweep.read_epochs(os.path.join(root, run))
    tuned = label.startswith("tuned.py")  # black, over the default cycle's 10 colors
    if epochs:
      ax.plot([e["epoch"] for e in epochs], [e["val_bpb"] for e in epochs], marker="o", markersize=3, label=label,
              **({"color": "black", "linewidth": 2} if tuned else {}))
  ax.set_xlabel("epoch")
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_ylabel("validation bits per byte")
  ax.set_ylim(top=2.6)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("wikitext-2-mini, one H200 (2026-11-30)", fontsize=10)
  fig.tight_layout()
  fig.savefig(os.path.join(root, "val_bpb.png"), dpi=120)
  plt.close(fig)
  guide = [d for d in run_dirs(root) if os.path.dirname(d) == os.path.join(root, "guide")]
  if guide and all(os.path.isdir(os.path.join(d, "tensorboard")) for d in guide):  # else keep the committed PNGs
    sweep.plot(os.path.join(root, "guide"), guide)


if __name__ == "__main__":
  root = sys.argv[1] if len(sys.argv) == 2 else ""
  if not (os.path.isdir(root) and run_dirs(root)):
    raise SystemExit("error: give one folder of tuning runs (guide/<config>/ and sweep folders), e.g. "
                     "python experiments/tuning_table.py experiments/results/2026-11-30_h200_tuning")
  main(root)
