"""The bias probe (`chatrlhf eval --bias`, docs/bias.md): counterfactual prompt sets and the gaps between groups.

The closed loop calls ``bias_report(cfg, model=…, sources=…)`` (eval.json's "bias" part) and
``bias_check(report, threshold) -> (ok, reasons)`` to stop a promotion."""

from chatrlhf.evaluate.bias.probe import bias_check, bias_report

__all__ = ["bias_check", "bias_report"]
