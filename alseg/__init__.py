"""alseg: cost-effective active learning (CEAL) with MC-dropout U-Nets for biomedical segmentation.

Everything the CLI does is importable from here.
"""
from alseg.config import PRESETS, ExperimentConfig, build_config
from alseg.data import CachedData, Dataset, Sample, detect_format, load_cached, open_dataset, summarize
from alseg.data.splits import Split, make_split
from alseg.errors import AlsegError
from alseg.evaluate import evaluate, score_model
from alseg.experiment import train_supervised
from alseg.rundata import prepare_data
from alseg.active.loop import run_active, status
from alseg.report import make_report
from alseg.compare import compare
from alseg.metrics import dice_per_image, pooled_dice, summarize_dice, volume_dice
from alseg.model import ModelConfig, UNet, count_parameters, set_mc_dropout
from alseg.predict import predict_folder
from alseg.annotate.exchange import export_project
from alseg.project import Project, export_effort, ingest, init_project, query, undo
from alseg.rundir import RunDir
from alseg.store import RunStore
from alseg.train import Checkpoint, TrainConfig, fit, predict_probs

__version__ = "0.1.0"

__all__ = [
    "AlsegError", "CachedData", "Checkpoint", "Dataset", "ExperimentConfig", "ModelConfig", "PRESETS", "Sample",
    "Split", "TrainConfig", "UNet", "build_config", "count_parameters", "detect_format", "dice_per_image",
    "evaluate", "fit", "load_cached", "make_split", "open_dataset", "pooled_dice", "predict_folder", "predict_probs",
    "prepare_data", "run_active", "status", "make_report", "compare", "score_model", "set_mc_dropout", "summarize", "summarize_dice", "train_supervised",
    "volume_dice", "Project", "RunDir", "RunStore", "ingest", "init_project", "query",
    "undo", "export_effort", "export_project",
]
