"""encoder-train: pretrain BERT/RoBERTa-style encoders with masked-language modelling."""

__version__ = "0.1.0"
