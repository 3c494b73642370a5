"""What a scored partition keeps in storage: the ``intermediates`` policy applied once a category
is scored, and the bytes per image each array stage then holds."""

from dagster import AssetExecutionContext, AssetObservation

from musc_pipeline.assets.context import ProfileContext
from musc_pipeline.resources.storage import ArrayIOManager


def drop_intermediates(p: ProfileContext, context: AssetExecutionContext, arrays: ArrayIOManager) -> None:
    """``intermediates: drop``: once a category is scored, drop its stored Y_l (the largest
    intermediate by far) and record that on ``lnamd_features`` as an observation."""
    if p.profile.intermediates != "drop":
        return
    key = p.key("lnamd_features")
    freed = arrays.drop_arrays(key, context.partition_key, "intermediates: drop (recomputed on demand)")
    if freed:
        context.log_event(AssetObservation(asset_key=key, partition=context.partition_key,
                                           metadata={"dropped": "intermediates: drop", "freed_bytes": freed}))
        context.log.info(f"dropped {key.to_user_string()} arrays for {context.partition_key}: {freed} bytes freed")


#: The array stages whose stored size per image each metrics row records (``stored_<stage>_bytes_per_image``).
STORED_STAGES = ("backbone_features", "lnamd_features", "msm_scores", "anomaly_maps", "salient_features")


def stored_bytes_per_image(context: AssetExecutionContext, p: ProfileContext, n: int) -> dict[str, float]:
    """Bytes per image each array stage of this partition holds in storage now."""
    out = {}
    for stage in STORED_STAGES:
        path = context.resources.arrays.partition_file(p.key(stage), context.partition_key)
        if path.exists():
            out[f"stored_{stage}_bytes_per_image"] = path.stat().st_size / n
    return out


def apply_storage_policy(p: ProfileContext, context: AssetExecutionContext, n: int) -> dict:
    """Once a category is scored: drop what the profile does not keep, then the metrics row's
    record of what is stored (bytes per image per stage, and the policy)."""
    drop_intermediates(p, context, context.resources.arrays)
    return stored_bytes_per_image(context, p, n) | {"intermediates": p.profile.intermediates}
