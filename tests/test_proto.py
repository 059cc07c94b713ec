"""The proto is the contract: generated code never drifts from it, and every element is documented."""
from __future__ import annotations

from pathlib import Path

import pytest

from speccascade import protogen


def test_generated_code_is_up_to_date(tmp_path):
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in protogen.generate(tmp_path)}
    installed_dir = protogen.OUT_DIR
    installed = {p.relative_to(installed_dir): p.read_bytes()
                 for p in installed_dir.glob("speccascade/v1/*_pb2*.py*")}
    assert fresh, "protoc generated nothing"
    assert sorted(installed) == sorted(fresh), \
        "generated files differ in name: run `python services/speccascade/protogen.py`"
    stale = [str(name) for name, content in fresh.items() if installed[name] != content]
    assert not stale, f"stale generated code {stale}: run `python services/speccascade/protogen.py`"


def _descriptor_set(tmp_path: Path):
    import grpc_tools
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "descriptors.pb"
    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(protogen.PROTO_DIR)) for p in protogen.proto_files()]
    assert protoc.main(["protoc", f"-I{protogen.PROTO_DIR}", f"-I{include}",
                        "--include_source_info", f"--descriptor_set_out={out}", *files]) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _elements(proto_file):
    """(name, source path) of every service, rpc, message, field, enum and enum value.

    Source paths index FileDescriptorProto fields: message_type=4, enum_type=5, service=6;
    inside a message field=2, nested_type=3, enum_type=4; enum value=2; service method=2."""
    def enum(e, path):
        yield e.name, path
        for i, value in enumerate(e.value):
            yield f"{e.name}.{value.name}", (*path, 2, i)

    def message(m, path):
        yield m.name, path
        for i, f in enumerate(m.field):
            yield f"{m.name}.{f.name}", (*path, 2, i)
        for i, nested in enumerate(m.nested_type):
            yield from message(nested, (*path, 3, i))
        for i, e in enumerate(m.enum_type):
            yield from enum(e, (*path, 4, i))

    for i, m in enumerate(proto_file.message_type):
        yield from message(m, (4, i))
    for i, e in enumerate(proto_file.enum_type):
        yield from enum(e, (5, i))
    for i, s in enumerate(proto_file.service):
        yield s.name, (6, i)
        for j, method in enumerate(s.method):
            yield f"{s.name}.{method.name}", (6, i, 2, j)


def test_every_rpc_and_field_is_commented(tmp_path):
    descriptors = _descriptor_set(tmp_path)
    assert descriptors.file
    for proto_file in descriptors.file:
        comments = {tuple(loc.path): (loc.leading_comments + loc.trailing_comments).strip()
                    for loc in proto_file.source_code_info.location}
        missing = [name for name, path in _elements(proto_file) if not comments.get(path)]
        assert not missing, f"{proto_file.name}: add a comment to {missing}"


def test_package_is_versioned(tmp_path):
    for proto_file in _descriptor_set(tmp_path).file:
        assert proto_file.package == "speccascade.v1"


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream", "Health", "Stats"])
def test_service_has_rpc(rpc):
    from speccascade.v1 import generation_pb2 as pb

    assert rpc in pb.DESCRIPTOR.services_by_name["Generation"].methods_by_name
