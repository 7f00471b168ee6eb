"""Image-generation metrics: the FID Inception-v3 (`inception`) and ADM's evaluator metrics
(`adm`: FID, sFID, Inception Score, improved Precision / Recall)."""
