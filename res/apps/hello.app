{
    "type": "application",
    "name": "hello",
    "description": "Hello service: the example of a service and its app file",
    "version": "0.1",
    "mod": ("ion.core.apps.processapp", ["hello", "ion.services.hello", "HelloService"], {}),
    "applications": [],
    "config": {"ion.services.hello": {"greeting": "Hello there"}},
}
