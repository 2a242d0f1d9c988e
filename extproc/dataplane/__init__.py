"""The data plane: what answers Envoy per request (the ext_proc, the retry processor, the
access-log receiver, health), on the lean HTTP/2 gRPC server, in wire form."""
