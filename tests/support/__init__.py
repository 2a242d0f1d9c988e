"""What the tests share: the gateway harness of the end-to-end tests (`helpers`), control-plane
credentials and the separate ext_proc client (`auth_helpers`, `ext_proc_client`), manifest
builders (`manifests`), and the builders and fixtures' parts that unit tests of several modules use."""
