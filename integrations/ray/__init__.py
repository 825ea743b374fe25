"""layertap for Ray Data: features of a whole dataset, one column per output key.

Install with ``pip install 'layertap[ray]'`` (the client and Ray Data) and, for
:class:`LocalExtractor`, ``'layertap[ray,server]'``. Importing ``layertap.ray`` imports neither
Ray nor torch: :class:`Extractor` is a plain callable class that Ray builds in each actor.

Against a layertap server or fleet (:class:`Extractor`)::

    import ray
    import layertap.ray

    ds = ray.data.read_images("s3://bucket/photos/", include_paths=True)  # "image", "path"
    ds = ds.map_batches(
        layertap.ray.Extractor,
        fn_constructor_kwargs=dict(
            target=["10.0.0.1:50051", "10.0.0.2:50051"],  # or "host:50051", "dns:///svc:50051"
            model="resnet50",
            nodes=["layer4"],
            pool="gem",
            normalize=True,
            drop_input=True,  # keep "path", drop the pixels
        ),
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=8),  # Ray < 2.51: concurrency=8
        num_cpus=0.5,  # an actor mostly waits on the network
    )
    ds.write_parquet("s3://bucket/features/")  # columns: path, layer4 (2048 float32 each)

**Actors and the fleet.** Each actor opens one :class:`~layertap.client.FeatureClient` and
sends each batch as one ``extract_many`` run over an ExtractStream (one image per stream item,
at most ``window`` unanswered). ``target`` may list every replica (a list, or
``"a:50051,b:50051"``; host names are resolved when the actor starts) or be one name that
resolves to all of them (``dns:///layertap-headless.ns.svc:50051``): streams are spread round
robin, and an image that fails with UNAVAILABLE (a replica stopping or gone) or a transient
RESOURCE_EXHAUSTED (a full queue) is resent with backoff, on another replica, up to ``retries``
times within ``timeout`` seconds. Every row is answered exactly once, in the batch's order
(checked: a row answered twice or never raises). ``priority`` is "low" by default, so a bulk
job yields to interactive callers of the same servers. The fleet holds at most
actors × ``window`` (default 32) of the job's images at once.

**Input column.** ``column=`` names it; by default the first present of ``image``, ``bytes``,
``path``. A row's value may be encoded bytes (``read_binary_files`` gives ``bytes``; Parquet
binary columns), a decoded uint8 [H, W, 3] RGB (or [H, W] gray, [H, W, 4] RGBA) array
(``read_images`` gives ``image``), or a path to an image file the actor can read (``str``).
Encoded images travel as they are and are decoded by the server (EXIF orientation applied);
decoded arrays travel as raw pixels (bigger on the wire: prefer bytes for a remote fleet). The
server resizes, crops and normalises either way, as for any client.

**Output columns.** One per output key, named as the key (the node name, e.g. ``layer4``, or
what ``nodes={"layer4": "emb"}`` maps it to; ``concat_key`` with ``concat=True``): a [N, ...]
numpy array (a fixed-shape tensor column in Ray), float32, float16, or int8 with
``dtype="int8"``. Outputs whose shapes differ from image to image (raw maps with
``native_resolution=True``) become variable-shaped tensor columns. An output name equal to an
existing column raises ValueError instead of replacing it. ``batch_format`` may be "numpy"
(the default) or "pandas"; ``drop_input=True`` leaves the image column out of the result.

**Failures.** ``errors="raise"`` (default): the first image that fails (undecodable, over a
server limit, retries used up) raises its :class:`~layertap.client.FeatureServiceError`, its
details prefixed with the row ("row 3 of a batch of 64: ..."); the batch fails and Ray retries
or fails the job per its own settings (``max_task_retries``, ``max_errored_blocks``).
``errors="null"``: the row is kept, its outputs are NaN (0 for int8 outputs: a tensor column
cannot hold nulls, and Ray would otherwise fall back to pickled Python objects), and an
``error`` column (``error_column=``) is always added: ``""`` for the rows that succeeded,
``"CODE: message"`` for the others, e.g. ``ds.filter(lambda row: row["error"] == "")``.
Failures of the whole connection (a wrong token, every replica down past ``retries``) raise in
either mode.

In-process, on Ray GPU workers (:class:`LocalExtractor`)::

    ds = ds.map_batches(
        layertap.ray.LocalExtractor,
        fn_constructor_kwargs=dict(arch="resnet50", weights="IMAGENET1K_V2",
                                   nodes=["layer4"], pool="gem", normalize=True),
        # or config="models.toml" (with model="name") or config={"arch": ..., ...}
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=4),
        num_gpus=1,
    )

Each actor runs layertap's own server inside its process, private to it (127.0.0.1 on a port
the OS picks, a random token, no HTTP, metrics or reflection), and calls it like a remote one:
the same catalogue, decode, preprocessing, batching, pooling and post steps as a server with
that ``[[models]]`` entry, so the vectors are the same. ``settings={...}`` passes server
settings (``device``, ``max_batch_size``, ``torch_threads``, ``compile_budget_s`` ...).

Not covered: region boxes per row (``regions=``) and Compare; call
:class:`~layertap.client.FeatureClient` from ``map_batches`` for those.
"""

from __future__ import annotations

from ._batches import IMAGE_COLUMNS
from ._extractor import Extractor, fleet_target
from ._local import LocalExtractor

__all__ = ["IMAGE_COLUMNS", "Extractor", "LocalExtractor", "fleet_target"]
