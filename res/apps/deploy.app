{
    "type": "application",
    "name": "deploy",
    "description": "Dependency deployment service (Deploy, with Fetch, Cache and Unpack)",
    "version": "0.1",
    "mod": ("ion.core.apps.processapp", ["deploy", "ion.services.deploy.service", "DeployService"], {}),
    "applications": ["fetch", "cache", "unpack"],
    "config": {},
}
