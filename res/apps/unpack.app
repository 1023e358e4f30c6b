{
    "type": "application",
    "name": "unpack",
    "description": "Unpack service: detects and safely extracts tar, tar.gz, tar.bz2, tar.xz and zip archives",
    "version": "0.1",
    "mod": ("ion.core.apps.processapp", ["unpack", "ion.services.unpack.service", "UnpackService"], {}),
    "applications": [],
    # Limits and allowed_roots come from res/config/ion.config ("ion.services.unpack"),
    # so that res/config/ionlocal.config can change them: none are set here.
    "config": {},
}
