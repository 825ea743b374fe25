from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_RAW: _ClassVar[Pooling]
    POOLING_AVG: _ClassVar[Pooling]
    POOLING_MAX: _ClassVar[Pooling]
    POOLING_GEM: _ClassVar[Pooling]
    POOLING_CLS: _ClassVar[Pooling]
    POOLING_MEAN: _ClassVar[Pooling]
    POOLING_AVGMAX: _ClassVar[Pooling]
    POOLING_CATAVGMAX: _ClassVar[Pooling]
    POOLING_RMAC: _ClassVar[Pooling]
    POOLING_RGEM: _ClassVar[Pooling]
    POOLING_CLS_MEAN: _ClassVar[Pooling]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_NORMAL: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]
POOLING_RAW: Pooling
POOLING_AVG: Pooling
POOLING_MAX: Pooling
POOLING_GEM: Pooling
POOLING_CLS: Pooling
POOLING_MEAN: Pooling
POOLING_AVGMAX: Pooling
POOLING_CATAVGMAX: Pooling
POOLING_RMAC: Pooling
POOLING_RGEM: Pooling
POOLING_CLS_MEAN: Pooling
PRIORITY_NORMAL: Priority
PRIORITY_LOW: Priority

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "layout")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    layout: str
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., layout: _Optional[str] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("resize_size", "crop_size", "mean", "std", "interpolation", "antialias", "resize_kernel", "resize_mode", "crop_offset")
    RESIZE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CROP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    ANTIALIAS_FIELD_NUMBER: _ClassVar[int]
    RESIZE_KERNEL_FIELD_NUMBER: _ClassVar[int]
    RESIZE_MODE_FIELD_NUMBER: _ClassVar[int]
    CROP_OFFSET_FIELD_NUMBER: _ClassVar[int]
    resize_size: int
    crop_size: _containers.RepeatedScalarFieldContainer[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    interpolation: str
    antialias: bool
    resize_kernel: str
    resize_mode: str
    crop_offset: str
    def __init__(self, resize_size: _Optional[int] = ..., crop_size: _Optional[_Iterable[int]] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., interpolation: _Optional[str] = ..., antialias: bool = ..., resize_kernel: _Optional[str] = ..., resize_mode: _Optional[str] = ..., crop_offset: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "architecture", "weights", "weights_sha256", "input_size", "preprocessing", "device", "ready", "status_message", "random_weights", "compute_dtype", "prefix_tokens", "extraction_mode", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXTRACTION_MODE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    weights: str
    weights_sha256: str
    input_size: _containers.RepeatedScalarFieldContainer[int]
    preprocessing: Preprocessing
    device: str
    ready: bool
    status_message: str
    random_weights: bool
    compute_dtype: str
    prefix_tokens: int
    extraction_mode: str
    source: str
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., weights: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., input_size: _Optional[_Iterable[int]] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., device: _Optional[str] = ..., ready: bool = ..., status_message: _Optional[str] = ..., random_weights: bool = ..., compute_dtype: _Optional[str] = ..., prefix_tokens: _Optional[int] = ..., extraction_mode: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_images_per_request", "max_image_bytes", "max_image_pixels", "max_message_bytes", "max_batch_size", "max_queue_images", "max_stream_in_flight", "max_parameter_bytes")
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_images_per_request: int
    max_image_bytes: int
    max_image_pixels: int
    max_message_bytes: int
    max_batch_size: int
    max_queue_images: int
    max_stream_in_flight: int
    max_parameter_bytes: int
    def __init__(self, max_images_per_request: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_queue_images: _Optional[int] = ..., max_stream_in_flight: _Optional[int] = ..., max_parameter_bytes: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "limits", "server_version")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    limits: ServerLimits
    server_version: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., server_version: _Optional[str] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype", "layout", "op", "target")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    layout: str
    op: str
    target: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., layout: _Optional[str] = ..., op: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class ModuleInfo(_message.Message):
    __slots__ = ("name", "type", "own_parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OWN_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    own_parameters: int
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., own_parameters: _Optional[int] = ...) -> None: ...

class DescribeModelResponse(_message.Message):
    __slots__ = ("model", "nodes", "modules", "extraction_mode", "extraction_reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    EXTRACTION_MODE_FIELD_NUMBER: _ClassVar[int]
    EXTRACTION_REASON_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    modules: _containers.RepeatedCompositeFieldContainer[ModuleInfo]
    extraction_mode: str
    extraction_reason: str
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., modules: _Optional[_Iterable[_Union[ModuleInfo, _Mapping]]] = ..., extraction_mode: _Optional[str] = ..., extraction_reason: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "tensor", "regions")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    regions: _containers.RepeatedCompositeFieldContainer[Box]
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., regions: _Optional[_Iterable[_Union[Box, _Mapping]]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class PostStep(_message.Message):
    __slots__ = ("op", "alpha", "head", "dim")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OP_UNSPECIFIED: _ClassVar[PostStep.Op]
        OP_L2: _ClassVar[PostStep.Op]
        OP_POWER: _ClassVar[PostStep.Op]
        OP_CENTER: _ClassVar[PostStep.Op]
        OP_PCA: _ClassVar[PostStep.Op]
        OP_WHITEN: _ClassVar[PostStep.Op]
    OP_UNSPECIFIED: PostStep.Op
    OP_L2: PostStep.Op
    OP_POWER: PostStep.Op
    OP_CENTER: PostStep.Op
    OP_PCA: PostStep.Op
    OP_WHITEN: PostStep.Op
    OP_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    op: PostStep.Op
    alpha: float
    head: str
    dim: int
    def __init__(self, op: _Optional[_Union[PostStep.Op, str]] = ..., alpha: _Optional[float] = ..., head: _Optional[str] = ..., dim: _Optional[int] = ...) -> None: ...

class TestTimeAugmentation(_message.Message):
    __slots__ = ("flip", "scales")
    FLIP_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    flip: bool
    scales: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, flip: bool = ..., scales: _Optional[_Iterable[float]] = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("pool", "gem_p", "normalize", "dtype", "post", "concat", "concat_key", "tta", "rmac_levels", "roi_size")
    POOL_FIELD_NUMBER: _ClassVar[int]
    GEM_P_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    POST_FIELD_NUMBER: _ClassVar[int]
    CONCAT_FIELD_NUMBER: _ClassVar[int]
    CONCAT_KEY_FIELD_NUMBER: _ClassVar[int]
    TTA_FIELD_NUMBER: _ClassVar[int]
    RMAC_LEVELS_FIELD_NUMBER: _ClassVar[int]
    ROI_SIZE_FIELD_NUMBER: _ClassVar[int]
    pool: Pooling
    gem_p: float
    normalize: bool
    dtype: str
    post: _containers.RepeatedCompositeFieldContainer[PostStep]
    concat: bool
    concat_key: str
    tta: TestTimeAugmentation
    rmac_levels: int
    roi_size: int
    def __init__(self, pool: _Optional[_Union[Pooling, str]] = ..., gem_p: _Optional[float] = ..., normalize: bool = ..., dtype: _Optional[str] = ..., post: _Optional[_Iterable[_Union[PostStep, _Mapping]]] = ..., concat: bool = ..., concat_key: _Optional[str] = ..., tta: _Optional[_Union[TestTimeAugmentation, _Mapping]] = ..., rmac_levels: _Optional[int] = ..., roi_size: _Optional[int] = ...) -> None: ...

class ExtractRequest(_message.Message):
    __slots__ = ("model", "images", "nodes", "aliases", "output", "priority", "native_resolution", "bypass_result_cache")
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    NATIVE_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    BYPASS_RESULT_CACHE_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    aliases: _containers.ScalarMap[str, str]
    output: OutputOptions
    priority: Priority
    native_resolution: bool
    bypass_result_cache: bool
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., nodes: _Optional[_Iterable[str]] = ..., aliases: _Optional[_Mapping[str, str]] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ..., priority: _Optional[_Union[Priority, str]] = ..., native_resolution: bool = ..., bypass_result_cache: bool = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("key", "node", "tensor")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    key: str
    node: str
    tensor: Tensor
    def __init__(self, key: _Optional[str] = ..., node: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ImageResult(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, outputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class ResolvedNode(_message.Message):
    __slots__ = ("key", "requested", "node")
    KEY_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    key: str
    requested: str
    node: str
    def __init__(self, key: _Optional[str] = ..., requested: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "decode_ms", "compute_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    decode_ms: float
    compute_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class ExtractMetadata(_message.Message):
    __slots__ = ("model", "weights_sha256", "nodes", "preprocessing", "timings", "batch_size", "device")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights_sha256: str
    nodes: _containers.RepeatedCompositeFieldContainer[ResolvedNode]
    preprocessing: Preprocessing
    timings: Timings
    batch_size: int
    device: str
    def __init__(self, model: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[ResolvedNode, _Mapping]]] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., batch_size: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class ExtractResponse(_message.Message):
    __slots__ = ("results", "metadata")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ImageResult]
    metadata: ExtractMetadata
    def __init__(self, results: _Optional[_Iterable[_Union[ImageResult, _Mapping]]] = ..., metadata: _Optional[_Union[ExtractMetadata, _Mapping]] = ...) -> None: ...

class ExtractStreamRequest(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: ExtractRequest
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[ExtractRequest, _Mapping]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "code_name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    code_name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., code_name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ExtractStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: ExtractResponse
    error: ItemError
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[ExtractResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("server_version", "limits", "image_formats", "input_dtypes", "pools", "output_dtypes", "models", "devices", "methods", "heads")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMATS_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPES_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    limits: ServerLimits
    image_formats: _containers.RepeatedScalarFieldContainer[str]
    input_dtypes: _containers.RepeatedScalarFieldContainer[str]
    pools: _containers.RepeatedScalarFieldContainer[str]
    output_dtypes: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedScalarFieldContainer[str]
    devices: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedScalarFieldContainer[str]
    heads: _containers.RepeatedCompositeFieldContainer[HeadInfo]
    def __init__(self, server_version: _Optional[str] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., image_formats: _Optional[_Iterable[str]] = ..., input_dtypes: _Optional[_Iterable[str]] = ..., pools: _Optional[_Iterable[str]] = ..., output_dtypes: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[str]] = ..., devices: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[str]] = ..., heads: _Optional[_Iterable[_Union[HeadInfo, _Mapping]]] = ...) -> None: ...

class HeadInfo(_message.Message):
    __slots__ = ("name", "model", "input_dim", "components", "nodes", "pool")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    input_dim: int
    components: int
    nodes: _containers.RepeatedScalarFieldContainer[str]
    pool: str
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., input_dim: _Optional[int] = ..., components: _Optional[int] = ..., nodes: _Optional[_Iterable[str]] = ..., pool: _Optional[str] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("model", "a", "b", "nodes", "style", "native_resolution")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    NATIVE_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    a: _containers.RepeatedCompositeFieldContainer[Image]
    b: _containers.RepeatedCompositeFieldContainer[Image]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    style: bool
    native_resolution: bool
    def __init__(self, model: _Optional[str] = ..., a: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., b: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., nodes: _Optional[_Iterable[str]] = ..., style: bool = ..., native_resolution: bool = ...) -> None: ...

class PairDistance(_message.Message):
    __slots__ = ("distance", "layer_distances", "style_distance", "style_layer_distances")
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    LAYER_DISTANCES_FIELD_NUMBER: _ClassVar[int]
    STYLE_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    STYLE_LAYER_DISTANCES_FIELD_NUMBER: _ClassVar[int]
    distance: float
    layer_distances: _containers.RepeatedScalarFieldContainer[float]
    style_distance: float
    style_layer_distances: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, distance: _Optional[float] = ..., layer_distances: _Optional[_Iterable[float]] = ..., style_distance: _Optional[float] = ..., style_layer_distances: _Optional[_Iterable[float]] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("model", "weights_sha256", "nodes", "pairs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights_sha256: str
    nodes: _containers.RepeatedCompositeFieldContainer[ResolvedNode]
    pairs: _containers.RepeatedCompositeFieldContainer[PairDistance]
    def __init__(self, model: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[ResolvedNode, _Mapping]]] = ..., pairs: _Optional[_Iterable[_Union[PairDistance, _Mapping]]] = ...) -> None: ...

class GetParametersRequest(_message.Message):
    __slots__ = ("model", "names", "dtype")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    names: _containers.RepeatedScalarFieldContainer[str]
    dtype: str
    def __init__(self, model: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., dtype: _Optional[str] = ...) -> None: ...

class GetParametersResponse(_message.Message):
    __slots__ = ("model", "parameters")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    parameters: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, model: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...
