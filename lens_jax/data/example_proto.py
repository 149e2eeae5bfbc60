"""The ``tf.train.Example`` message, defined here from its schema, for the record format.

Lens records (``lens_jax.data.records``) are serialized ``tf.train.Example`` protocol buffers.
This module builds the message classes from the schema of ``tensorflow/core/example/example.proto``
and ``feature.proto`` (wire-compatible: same package, names, field numbers and types) in a
descriptor pool of its own, at import time, with nothing but ``protobuf``:

- no TensorFlow, and no ``tensorflow_datasets`` import in the grain workers that decode records
  (importing tensorflow-datasets from two prefetch threads of one worker at once deadlocked in its
  lazy imports: ``benchmarks/data.py --workers 4`` hung on 2026-12-02);
- a pool of its own, so that this definition and TFDS' generated one (same full names) can both
  be loaded in one process.

Schema (proto3):

    message BytesList { repeated bytes value = 1; }
    message FloatList { repeated float value = 1 [packed = true]; }
    message Int64List { repeated int64 value = 1 [packed = true]; }
    message Feature { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                                   Int64List int64_list = 3; } }
    message Features { map<string, Feature> feature = 1; }
    message Example { Features features = 1; }
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "tensorflow"
_FIELD = descriptor_pb2.FieldDescriptorProto


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(name="lens_jax/tf_example.proto", package=_PACKAGE,
                                           syntax="proto3")

    def message(name: str) -> descriptor_pb2.DescriptorProto:
        m = f.message_type.add()
        m.name = name
        return m

    def field(m, name: str, number: int, kind: int, label: int = _FIELD.LABEL_OPTIONAL,
              type_name: str = "", oneof: int | None = None) -> None:
        fd = m.field.add(name=name, number=number, type=kind, label=label, json_name=name)
        if type_name:
            fd.type_name = f".{_PACKAGE}.{type_name}"
        if oneof is not None:
            fd.oneof_index = oneof

    for name, kind in (("BytesList", _FIELD.TYPE_BYTES), ("FloatList", _FIELD.TYPE_FLOAT),
                       ("Int64List", _FIELD.TYPE_INT64)):
        # proto3 packs repeated scalars by default, as feature.proto asks explicitly
        field(message(name), "value", 1, kind, _FIELD.LABEL_REPEATED)
    feature = message("Feature")
    feature.oneof_decl.add(name="kind")
    for number, name in enumerate(("bytes_list", "float_list", "int64_list"), start=1):
        kind_name = {"bytes_list": "BytesList", "float_list": "FloatList",
                     "int64_list": "Int64List"}[name]
        field(feature, name, number, _FIELD.TYPE_MESSAGE, type_name=kind_name, oneof=0)
    features = message("Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    field(entry, "key", 1, _FIELD.TYPE_STRING)
    field(entry, "value", 2, _FIELD.TYPE_MESSAGE, type_name="Feature")
    field(features, "feature", 1, _FIELD.TYPE_MESSAGE, _FIELD.LABEL_REPEATED,
          type_name="Features.FeatureEntry")
    field(message("Example"), "features", 1, _FIELD.TYPE_MESSAGE, type_name="Features")
    return f


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file_descriptor())


def _message_class(name: str):
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.{name}"))


Example = _message_class("Example")
Features = _message_class("Features")
Feature = _message_class("Feature")
BytesList = _message_class("BytesList")
FloatList = _message_class("FloatList")
Int64List = _message_class("Int64List")
