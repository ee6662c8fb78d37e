"""QwT: closed-form linear compensation of quantised blocks."""
from .blockwise import (BlockPlan, BlockReport, QwTConfig, Step, conv_groups, fit_compensation, infer_stride,
                        stage_steps)
from .modules import Compensated, ConvCompensated, LinearCompensated
from .solver import FitResult, GroupedConvLeastSquares, LinearLeastSquares, SingularSystemError

__all__ = ["BlockPlan", "BlockReport", "QwTConfig", "Step", "fit_compensation", "stage_steps", "conv_groups",
           "infer_stride", "Compensated", "ConvCompensated", "LinearCompensated", "FitResult",
           "GroupedConvLeastSquares",
           "LinearLeastSquares", "SingularSystemError"]
