"""Placeholder: being written."""
def load(spec, teachers_dir, device):
    from mmkd.teachers.registry import TeacherLoadError
    raise TeacherLoadError(f"teacher '{spec.name}': loader openclip not written yet")
