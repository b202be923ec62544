"""End of the main job: export the trained model, serve it, query it once over gRPC and once over REST."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.common import REPO

from csmf_tf.data.features import USER_ID
from csmf_tf.data.prepared import PreparedData
from csmf_tf.metrics.prior import PopularityPrior
from csmf_tf.models.cascade import CascadeTwoTower
from csmf_tf.serving.export import export_retrieval_model
from csmf_tf.testing.smoke import serve_and_query_once
from csmf_tf.training.checkpoints import ownership_map


def export_and_query(model: CascadeTwoTower, data: PreparedData, config, out: Path,
                     prior: PopularityPrior | None = None, base_path: Path = REPO / "saved_models",
                     model_name: str = "csmf") -> dict:
    """Export ``model`` as the next version of ``<base_path>/<model_name>`` (ScaNN index over every
    item; its recall on the users' queries must reach the export's floor), then start the server on
    ephemeral 127.0.0.1 ports, send one gRPC and one REST query with the configured fusion weights,
    check they agree, and stop the server."""
    user = {k: np.asarray(v) for k, v in data.users.take(np.array([0])).as_inputs(USER_ID).items()}
    version_dir = export_retrieval_model(
        model.user_model, model.item_model, data.items, model.owner_stage, model.objectives,
        base_path=base_path, model_name=model_name, default_weights=config.fusion_weights,
        extra_assets={"training_config.json": config.to_json(), "unit_ownership.json": ownership_map(model)},
        warmup_inputs=user, popularity_prior=prior, granularity=config.granularity,
        ann_recall_users=data.users.as_inputs(USER_ID))
    recall = json.loads((version_dir / "assets" / "config.json").read_text())["ann_recall"]
    print(f"\nexported {version_dir} (ANN recall@{recall['k']} {recall['recall_at_k']:.4f} against exact search "
          f"on {recall['num_queries']} users)", flush=True)
    return serve_and_query_once(Path(version_dir).parent, model_name, user, config.fusion_weights, k=10)
