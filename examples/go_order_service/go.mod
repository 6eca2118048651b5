module example.com/go_order_service

go 1.21
