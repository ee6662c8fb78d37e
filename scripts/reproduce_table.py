"""Run a task's whole table (every model × bit setting, or the description's list of runs), then assemble it next
to the paper's numbers where there are some.

    python scripts/reproduce_table.py QwT-cls-RepQ-ViT --data-dir /data/imagenet --checkpoints /data/weights
    python scripts/reproduce_table.py QwT-det-RepQ-ViT --coco-root /data/coco --checkpoints /data/det_weights
    python scripts/reproduce_table.py QwT-cls-ResNet --smoke

The task folder's configs/table.json lists the runs (models × bit settings, or explicit flag lists: QwT-llm) and,
for a paper table, the metrics to compare. Checkpoints are looked up as
CHECKPOINTS/<model><suffix> before the first run; a rerun skips runs whose record is complete and made with the
same flags; the table is assembled from those records only, and runs without one are listed as missing.
Extra flags go to the task's main.py.
"""
import sys
from pathlib import Path

from qwt.tasks.tables import reproduce

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    sys.exit(reproduce(Path(sys.argv[1]), sys.argv[2:]))
