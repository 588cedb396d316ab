"""Data: layouts on disk (sources), decoded pixels (cache), and train/val/test splits."""
from alseg.data.cache import CachedData, default_cache_dir, load_cached
from alseg.data.samples import sample_header, sample_image, sample_mask
from alseg.data.sources import FORMATS, Dataset, Sample, detect_format, open_dataset
from alseg.data.summary import summarize
from alseg.data.volumes import VolumeInfo

__all__ = ["CachedData", "Dataset", "FORMATS", "Sample", "VolumeInfo", "default_cache_dir", "detect_format",
           "load_cached", "open_dataset", "sample_header", "sample_image", "sample_mask", "summarize"]
