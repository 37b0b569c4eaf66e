from recsys.data.datamodule import SequenceDataModule
from recsys.data.sequences import SequenceData

__all__ = ["SequenceDataModule", "SequenceData"]
