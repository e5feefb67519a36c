"""Any rule in a rehearsal (config rehearse): the rule's own script (params.stage_script), run in this process
inside lslo.rehearsal.measured_job, which writes the job's clock (output `clock`): wall time, peak memory, bytes
written and, for training and decoding, the seconds of each update and decoding batch."""

import runpy
from pathlib import Path

from lslo.rehearsal import measured_job

params, out = snakemake.params, snakemake.output
outputs = [path for path in out if path != out.clock]
job = {"rule": snakemake.rule, "wildcards": dict(snakemake.wildcards.items())}
with measured_job(out.clock, outputs, job, checkpoint_dir=params.get("checkpoint_dir"), timed=params.timed):
    runpy.run_path(str(Path(snakemake.scriptdir, f"{params.stage_script}.py")), init_globals={"snakemake": snakemake},
                   run_name="__main__")
