"""Benchmark MVFA beside any anomalib model: ``anomalib-mvfa benchmark --config <file>.yaml``.

The config names models and datamodules by class path (so any anomalib model works, without
anomalib's model whitelist), categories and seeds. Every model x datamodule x category x seed
job trains and tests through anomalib's Engine; the command writes a CSV of all jobs and a
Markdown table with mean and standard deviation over seeds of image AUROC, pixel AUROC, image F1,
fit seconds, inference images per second and peak memory.

Every job runs in a new process of its own, so that no job changes what the next one measures and
the peak-memory column is the job's own (``--in-process`` runs them in this process instead). Jobs
run one after another on a CPU or a single GPU; with several GPUs, one job per GPU at a time
(``--workers`` sets how many run at once). A job that fails, its process killed for lack of memory
included, gets a row that says so, and the other jobs still run; the command then exits with 1, saying
how many failed. SIGTERM or SIGINT ends every job process and the command. Every run writes into a new
version folder of its own under the output folder (``v0``, ``v1``, ...; ``latest`` links the newest).

``random_weights: true`` runs every model offline on random weights (Mvfa ``pretrained=None``,
PatchCore ``pre_trained=False``, WinCLIP without its download): for speed studies only, and the
rows say that their accuracy means nothing.

Where a test split holds volumes (NIfTI files, DICOM series), the tables get a study_AUROC column, a
study abnormal when any of its slices is; ``study_labels: <file>.csv`` (or ``--study-labels``) gives
the studies' labels instead (:func:`~anomalib_mvfa.studies.read_study_labels`).

Example config::

    models:
      - class_path: anomalib_mvfa.Mvfa
        init_args: {backbone: ViT-B-16, image_size: 224, feature_layers: [3, 6, 9, 12], epochs: 5}
      - class_path: anomalib.models.Patchcore
      - class_path: anomalib.models.WinClip
        init_args: {k_shot: 4}
    data:
      - class_path: anomalib.data.MVTecAD
        init_args: {root: datasets/MVTecAD, val_split_mode: from_test}
    categories: [bottle]
    seeds: [0, 1, 2]

The modules of this package import each other in one direction only: :mod:`.config` (the YAML
config, light), :mod:`.jobs` (a :class:`Job` and its run folder), :mod:`.tables` (the CSV and
Markdown tables), :mod:`.report` (the curves and the HTML page, from the jobs' run folders),
:mod:`.runner` (training and testing the jobs) and :mod:`.command` (the command line), each
importing only modules listed before it.
"""

from .command import add_arguments, run
from .config import METRICS, RANDOM_WEIGHTS, BenchmarkConfig, load_class, weights_label
from .jobs import Job, grid
from .report import write_benchmark_report
from .runner import PeakMemory, build_model, failed_row, fix_mmap_threshold, run_job, run_jobs
from .tables import summary_rows, summary_table, write_tables

__all__ = [
    "METRICS",
    "RANDOM_WEIGHTS",
    "BenchmarkConfig",
    "Job",
    "PeakMemory",
    "add_arguments",
    "build_model",
    "failed_row",
    "fix_mmap_threshold",
    "grid",
    "load_class",
    "run",
    "run_job",
    "run_jobs",
    "summary_rows",
    "summary_table",
    "weights_label",
    "write_benchmark_report",
    "write_tables",
]
