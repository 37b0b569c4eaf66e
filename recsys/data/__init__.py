from recsys.data.datamodule import SequenceDataModule
from recsys.data.preprocess import SequenceData

__all__ = ["SequenceDataModule", "SequenceData"]
