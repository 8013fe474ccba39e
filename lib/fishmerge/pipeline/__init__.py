"""The pipeline's core steps: validation search, evaluation metrics, the baselines (originals, output
ensemble, and every merge method compared) with a content-addressed result cache, the report."""

from fishmerge.lazy import exports

__all__, __getattr__, __dir__ = exports(
    __name__,
    {
        "candidates": "search",
        "search": "search",
        "Scorer": "search",
        "load_inputs": "search",
        "merge_in_memory": "search",
        "classification_metrics": "evaluation",
        "perplexity": "evaluation",
        "evaluate_merged": "baselines",
        "evaluate_references": "baselines",
        "evaluate_method": "baselines",
        "cached_search": "baselines",
        "cached_evaluation": "baselines",
        "merge_report_markdown": "report",
        "write_pipeline_report": "report",
    },
)
