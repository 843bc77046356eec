"""The gRPC layer: servicers (thin), interceptors and the server builder."""
