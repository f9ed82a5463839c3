"""Architectures: MLP, LeNet-5, CIFAR ResNet-20 (FRN/BN/GN), torchvision adapters, a char-level GPT-2
and a classifier on any local Hugging Face encoder (the pretrained MiniLM)."""

from .lenet import LeNet5
from .mlp import MLP
from .registry import build_model, register_model
from .resnet import Norm, ResNet20, resnet20
from .text import EncoderClassifier, causal_lm_loss, char_gpt2, minilm_classifier, minilm_path
from .vision import adapt_classifier, torchvision_classifier

__all__ = [
    "MLP",
    "LeNet5",
    "Norm",
    "ResNet20",
    "resnet20",
    "adapt_classifier",
    "torchvision_classifier",
    "char_gpt2",
    "causal_lm_loss",
    "EncoderClassifier",
    "minilm_classifier",
    "minilm_path",
    "build_model",
    "register_model",
]
