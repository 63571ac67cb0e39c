from kvbridge_vllm.proxy import main

main()
