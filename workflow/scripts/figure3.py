"""Rule figure3: dev spBLEU per epoch, H2H and V2V (Figure 3, §7.2); pretrain drawn as a baseline line."""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

from lslo.figures import figure3_dev_curves  # noqa: E402

params = snakemake.params
rows = list(zip(params.labels, snakemake.input.metrics, params.baselines))
figure3_dev_curves(metrics_tsvs={label: path for label, path, baseline in rows if not baseline},
                   baselines={label: path for label, path, baseline in rows if baseline}, out=snakemake.output.png)
