"""Evaluation: log-likelihood tables (the poster's Table 1), cross-modal coherence with trained
digit classifiers, MCC, and the exact LinearGaussian diagnostics (relative LLH gap, KLs)."""
from mmfast.eval import plots
from mmfast.eval.coherence import coherence, coherence_report, train_classifiers
from mmfast.eval.latents import inferred_latents
from mmfast.eval.likelihood import format_table, log_likelihood_table, table1
from mmfast.eval.linear_gaussian import linear_gaussian_report
from mmfast.eval.mcc import correlation_matrix, linear_assignment, mcc

__all__ = ["log_likelihood_table", "table1", "format_table", "linear_gaussian_report", "mcc",
           "linear_assignment", "correlation_matrix", "inferred_latents", "coherence",
           "coherence_report", "train_classifiers", "plots"]
