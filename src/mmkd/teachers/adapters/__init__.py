"""Placeholder: being written."""
def load_adapter(spec, teachers_dir, device):
    from mmkd.teachers.registry import TeacherLoadError
    raise TeacherLoadError(f"teacher '{spec.name}': adapters not written yet")
