from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUNNING: _ClassVar[JobState]
    FINISHED: _ClassVar[JobState]
    LOST_IN_SPACE: _ClassVar[JobState]
    PARTIAL: _ClassVar[JobState]
    REMOTE_ERROR: _ClassVar[JobState]
RUNNING: JobState
FINISHED: JobState
LOST_IN_SPACE: JobState
PARTIAL: JobState
REMOTE_ERROR: JobState

class Repository(_message.Message):
    __slots__ = ("url", "scheme", "location", "prefix")
    URL_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    url: str
    scheme: str
    location: str
    prefix: str
    def __init__(self, url: _Optional[str] = ..., scheme: _Optional[str] = ..., location: _Optional[str] = ..., prefix: _Optional[str] = ...) -> None: ...

class FileDigests(_message.Message):
    __slots__ = ("digests",)
    class DigestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.ScalarMap[str, str]
    def __init__(self, digests: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("repository", "name", "version", "platform", "destination", "link", "unpack", "keep_updated", "digest", "files", "position")
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    UNPACK_FIELD_NUMBER: _ClassVar[int]
    KEEP_UPDATED_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    repository: Repository
    name: str
    version: str
    platform: str
    destination: str
    link: bool
    unpack: bool
    keep_updated: bool
    digest: str
    files: FileDigests
    position: str
    def __init__(self, repository: _Optional[_Union[Repository, _Mapping]] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., platform: _Optional[str] = ..., destination: _Optional[str] = ..., link: _Optional[bool] = ..., unpack: _Optional[bool] = ..., keep_updated: _Optional[bool] = ..., digest: _Optional[str] = ..., files: _Optional[_Union[FileDigests, _Mapping]] = ..., position: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("repository", "platform", "name", "version", "unpack", "keep_updated", "digest", "files", "label", "base_dir", "job", "item")
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UNPACK_FIELD_NUMBER: _ClassVar[int]
    KEEP_UPDATED_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    BASE_DIR_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    repository: Repository
    platform: str
    name: str
    version: str
    unpack: bool
    keep_updated: bool
    digest: str
    files: FileDigests
    label: str
    base_dir: str
    job: str
    item: str
    def __init__(self, repository: _Optional[_Union[Repository, _Mapping]] = ..., platform: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., unpack: _Optional[bool] = ..., keep_updated: _Optional[bool] = ..., digest: _Optional[str] = ..., files: _Optional[_Union[FileDigests, _Mapping]] = ..., label: _Optional[str] = ..., base_dir: _Optional[str] = ..., job: _Optional[str] = ..., item: _Optional[str] = ...) -> None: ...

class EntryKey(_message.Message):
    __slots__ = ("repo_id", "platform", "name", "version", "unpack")
    REPO_ID_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UNPACK_FIELD_NUMBER: _ClassVar[int]
    repo_id: str
    platform: str
    name: str
    version: str
    unpack: bool
    def __init__(self, repo_id: _Optional[str] = ..., platform: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., unpack: _Optional[bool] = ...) -> None: ...

class FetchResult(_message.Message):
    __slots__ = ("state", "path", "files", "links", "content", "key", "size", "url", "fetched_at", "stamp", "warnings")
    class LinksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    FETCHED_AT_FIELD_NUMBER: _ClassVar[int]
    STAMP_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    state: str
    path: str
    files: _containers.RepeatedScalarFieldContainer[str]
    links: _containers.ScalarMap[str, str]
    content: _containers.RepeatedScalarFieldContainer[str]
    key: EntryKey
    size: int
    url: str
    fetched_at: float
    stamp: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, state: _Optional[str] = ..., path: _Optional[str] = ..., files: _Optional[_Iterable[str]] = ..., links: _Optional[_Mapping[str, str]] = ..., content: _Optional[_Iterable[str]] = ..., key: _Optional[_Union[EntryKey, _Mapping]] = ..., size: _Optional[int] = ..., url: _Optional[str] = ..., fetched_at: _Optional[float] = ..., stamp: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class ItemResult(_message.Message):
    __slots__ = ("item", "position", "state", "already", "reason", "destination", "entry", "names", "link")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    item: str
    position: str
    state: str
    already: bool
    reason: str
    destination: str
    entry: str
    names: _containers.RepeatedScalarFieldContainer[str]
    link: bool
    def __init__(self, item: _Optional[str] = ..., position: _Optional[str] = ..., state: _Optional[str] = ..., already: _Optional[bool] = ..., reason: _Optional[str] = ..., destination: _Optional[str] = ..., entry: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., link: _Optional[bool] = ...) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("source", "items", "partial", "file", "host", "file_sha256")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    FILE_SHA256_FIELD_NUMBER: _ClassVar[int]
    source: str
    items: _containers.RepeatedCompositeFieldContainer[Item]
    partial: bool
    file: str
    host: str
    file_sha256: str
    def __init__(self, source: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., partial: _Optional[bool] = ..., file: _Optional[str] = ..., host: _Optional[str] = ..., file_sha256: _Optional[str] = ...) -> None: ...

class DeploySummary(_message.Message):
    __slots__ = ("source", "ok", "items")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    source: str
    ok: bool
    items: _containers.RepeatedCompositeFieldContainer[ItemResult]
    def __init__(self, source: _Optional[str] = ..., ok: _Optional[bool] = ..., items: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ...) -> None: ...

class JobStarted(_message.Message):
    __slots__ = ("job", "total")
    JOB_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    job: str
    total: int
    def __init__(self, job: _Optional[str] = ..., total: _Optional[int] = ...) -> None: ...

class JobQuery(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class JobOwner(_message.Message):
    __slots__ = ("container", "host", "pid", "process")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    container: str
    host: str
    pid: int
    process: str
    def __init__(self, container: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., process: _Optional[str] = ...) -> None: ...

class JobTakeover(_message.Message):
    __slots__ = ("from_owner", "by_owner", "at")
    FROM_OWNER_FIELD_NUMBER: _ClassVar[int]
    BY_OWNER_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    from_owner: JobOwner
    by_owner: JobOwner
    at: float
    def __init__(self, from_owner: _Optional[_Union[JobOwner, _Mapping]] = ..., by_owner: _Optional[_Union[JobOwner, _Mapping]] = ..., at: _Optional[float] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job", "kind", "status", "total", "error", "created", "ended", "cancelled", "results", "from_record", "died", "owner", "takeovers")
    class ResultsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ItemResult
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ItemResult, _Mapping]] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    FROM_RECORD_FIELD_NUMBER: _ClassVar[int]
    DIED_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TAKEOVERS_FIELD_NUMBER: _ClassVar[int]
    job: str
    kind: str
    status: JobState
    total: int
    error: str
    created: float
    ended: float
    cancelled: _containers.RepeatedScalarFieldContainer[str]
    results: _containers.MessageMap[str, ItemResult]
    from_record: bool
    died: bool
    owner: JobOwner
    takeovers: _containers.RepeatedCompositeFieldContainer[JobTakeover]
    def __init__(self, job: _Optional[str] = ..., kind: _Optional[str] = ..., status: _Optional[_Union[JobState, str]] = ..., total: _Optional[int] = ..., error: _Optional[str] = ..., created: _Optional[float] = ..., ended: _Optional[float] = ..., cancelled: _Optional[_Iterable[str]] = ..., results: _Optional[_Mapping[str, ItemResult]] = ..., from_record: _Optional[bool] = ..., died: _Optional[bool] = ..., owner: _Optional[_Union[JobOwner, _Mapping]] = ..., takeovers: _Optional[_Iterable[_Union[JobTakeover, _Mapping]]] = ...) -> None: ...
