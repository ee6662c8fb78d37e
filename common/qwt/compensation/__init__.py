"""QwT: closed-form linear compensation of quantised blocks."""
from .blockwise import (BlockFit, BlockPlan, BlockReport, BlockReports, QwTConfig, Step, conv_groups,
                        dense_block_fit, fit_compensation, infer_stride, remove_compensation, stage_steps)
from .channelwise import ChannelAffine, channelwise_block_fit, fold_channelwise
from .guard import compensation_batches, heldout_batches, heldout_inputs
from .modules import Compensated, ConvCompensated, LinearCompensated, LowRankCompensated
from .output_guard import GUARD_DEPTHS, model_guard
from .solver import SOLVER_MODES, FitResult, GroupedConvLeastSquares, LinearLeastSquares, SingularSystemError

__all__ = ["BlockFit", "BlockPlan", "BlockReport", "BlockReports", "QwTConfig", "Step", "fit_compensation",
           "dense_block_fit", "remove_compensation", "channelwise_block_fit", "ChannelAffine", "fold_channelwise",
           "stage_steps", "conv_groups", "infer_stride", "Compensated", "ConvCompensated", "LinearCompensated",
           "LowRankCompensated", "FitResult",
           "GroupedConvLeastSquares", "LinearLeastSquares", "SingularSystemError", "SOLVER_MODES",
           "compensation_batches", "heldout_batches", "heldout_inputs", "model_guard", "GUARD_DEPTHS"]
