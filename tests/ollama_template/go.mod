module llamafarm/ollamatemplate

go 1.19
