"""avssl.finetune: heads, tasks, datasets and metrics for emotion, speaker verification and spoof detection."""
