"""speccascade.v1: Python code generated from proto/speccascade/v1 (see speccascade.protogen)."""
